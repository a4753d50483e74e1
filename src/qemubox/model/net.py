"""The guest network as QEMU's user networking lays it out: one home for its addresses."""

GUEST_IP = "10.0.2.15"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
PREFIX = 24
