"""Device parametrisation shared by the test files (CUDA cases carry the `cuda` mark, which
tests/conftest.py skips without a GPU: the one CUDA skip mechanism of the suite; emulated ones the
`emulated_cuda` mark)."""
import pytest


def cpu_and_cuda():
    """Parametrise a test over the CPU and (marked `cuda`, skipped without a GPU) CUDA."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def cpu_emulated_and_cuda():
    """Parametrise (indirect=True, through conftest's `device` fixture) over the CPU kernels, the CUDA
    kernels run on the CPU by the emulated backend (marked `emulated_cuda`; what CI exercises of the
    CUDA sources) and a GPU (marked `cuda`). The test gets the torch device its tensors live on."""
    return ("cpu", pytest.param("emulated", marks=pytest.mark.emulated_cuda),
            pytest.param("cuda", marks=pytest.mark.cuda))
