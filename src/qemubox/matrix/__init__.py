"""Test matrices: kernels × tests × further axes, each cell a sandbox run. ``spec`` reads a
matrix file into cells (validated before anything runs), ``ktap`` reads the kernel's test
output format, ``execute`` runs cells (threads here, or tasks on a Dask cluster), ``report``
writes JSON, JUnit XML and the summary."""

from qemubox.matrix.spec import Cell, KernelSpec, Matrix, TestSpec

__all__ = ["Cell", "KernelSpec", "Matrix", "TestSpec"]
