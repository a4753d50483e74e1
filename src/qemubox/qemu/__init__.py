"""QEMU: its command line, its process, its monitor, the accelerator."""
