"""Bisecting a kernel tree: ``git bisect run`` driven over builds and boots of each revision
(drive.py), one revision judged by building it and running a command on it (step.py), and
the git that both need (git.py)."""
