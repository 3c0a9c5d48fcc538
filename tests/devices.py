"""Device parametrisation shared by the test files (CUDA cases carry the `cuda` mark, which
tests/conftest.py skips without a GPU: the one CUDA skip mechanism of the suite)."""
import pytest


def cpu_and_cuda():
    """Parametrise a test over the CPU and (marked `cuda`, skipped without a GPU) CUDA."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))
