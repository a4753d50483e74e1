"""A virtual machine: what it is (spec, plan) and what runs it (machine)."""
