"""The ground floor: plain data every other package shares — the machine plan, the validated
session, sizes, the guest network's addresses, the phases of a start. Imports nothing of
qemubox but ``errors`` and ``arch``."""
