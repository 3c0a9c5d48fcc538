"""Shared test fixtures: device parametrisation, the cuda/large marks, poisoned allocations."""
import os

import pytest
import torch


def cpu_and_cuda():
    """Parametrise a test over the CPU and (marked `cuda`, skipped without a GPU) CUDA."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_large = pytest.mark.skip(reason="allocates past 2^31 elements; set FASTCONV_RUN_LARGE=1")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "large" in item.keywords and os.environ.get("FASTCONV_RUN_LARGE") != "1":
            item.add_marker(skip_large)


@pytest.fixture
def poison():
    """Makes every empty tensor ATen allocates start as NaN, so output elements a kernel forgot
    to write show up as NaN instead of passing by luck."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_det)
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
