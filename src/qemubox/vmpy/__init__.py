"""Persistent VMs (``qemubox vm``): a long-lived machine with a distribution on a qcow2 disk,
booted with its own kernel or with one just built on the host (its modules over 9p).

``conf`` (vmpy.conf), ``layout`` (a VM's directory and runtime files), ``config`` (its
config.py), ``kernel`` (``-k BUILD``), ``command`` (the QEMU command line, pure),
``control`` (a running VM over QMP), ``install`` (an unattended Debian install)."""
