"""Egress rules kept on the host: QEMU's preloaded shim (shim.c) hands the guest's
connections and DNS to a proxy (proxy.py) that judges them by the rules (model/egress.py)."""

# In a machine's runtime directory:
CONTROL = "egress.sock"  # the proxy's control socket, which QEMU's shim connects to
RULES = "egress.json"  # the rules in force (the proxy reads it again as it changes)
