"""Machines: preparing what a plan needs (``prepare``), running one (``machine``), saving and
restoring booted guests (``snapshot``) and keeping restored ones ahead (``pool``). What a
machine is — its plan — is in ``model/``; what a user asks for, in ``sandbox/``."""
