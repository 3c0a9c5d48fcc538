"""Shared test fixtures: the cuda/emulated_cuda/large marks (the only place they skip), the CUDA
backends (a GPU and the emulated kernels), poisoned allocations. Device parametrisation: tests/devices.py."""
import os

import pytest
import torch

import fastconv  # noqa: F401  (registers torch.ops.fastconv before the emulated backend is loaded)

# ----------------------------------------------------------------------------- emulated CUDA backend

def _load_emulated():
    """Loads the emulated CUDA backend (csrc/cuda/*.cu compiled for the CPU, torch.ops.fastconv_emulated):
    the library named by FASTCONV_EMULATED_LIB (e.g. the ASan+UBSan build of scripts/test_emulated_asan.sh),
    else the fastconv._C_emulated module that setup.py builds. Returns None, or why it is missing."""
    path = os.environ.get("FASTCONV_EMULATED_LIB")
    try:
        if path:
            torch.ops.load_library(path)
        else:
            import fastconv._C_emulated  # noqa: F401
        return None
    except (ImportError, OSError) as e:
        return f"emulated CUDA backend not built ({e}); rebuild without FASTCONV_EMULATED=0"


EMULATED_MISSING = _load_emulated()


def cuda_backends():
    """Parametrise a test over the CUDA kernels on a GPU (marked `cuda`) and the same kernels' sources
    run on the CPU by the emulated backend (marked `emulated_cuda`)."""
    return (pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("emulated", marks=pytest.mark.emulated_cuda))


class Backend:
    """What a CUDA-kernel test needs to know: the device its tensors live on and the ops to call."""

    def __init__(self, name):
        self.name = name
        self.emulated = name == "emulated"
        self.device = torch.device("cpu") if self.emulated else torch.device("cuda")
        self.ops = torch.ops.fastconv_emulated if self.emulated else torch.ops.fastconv

    def __repr__(self):
        return self.name


class emulated_knobs:
    """Context manager: the emulated backend's workspace bound (bytes; 0 = the kernels' 256 MiB) and
    forced int64 index path, restored on exit."""

    def __init__(self, workspace=0, index64=False):
        self.workspace, self.index64 = workspace, index64

    def __enter__(self):
        E = torch.ops.fastconv_emulated
        self.old = (E._set_workspace_limit(self.workspace), E._set_force_index64(self.index64))
        return self

    def __exit__(self, *exc):
        E = torch.ops.fastconv_emulated
        E._set_workspace_limit(self.old[0])
        E._set_force_index64(self.old[1])


_PUBLIC_OPS = ("conv2d", "_conv2d_backward", "max_pool2d", "_max_pool2d_backward")


class route_fastconv_cpu_to_emulated:
    """Context manager: torch.ops.fastconv.* on CPU tensors run the emulated CUDA kernels, so that the
    public API (fastconv.functional, the modules, autograd, torch.compile, opcheck) exercises the CUDA
    backend's code. Overrides the CPU kernels in the dispatcher; exit restores them."""

    def __enter__(self):
        import warnings
        self.lib = torch.library.Library("fastconv", "IMPL")
        E = torch.ops.fastconv_emulated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            for name in _PUBLIC_OPS:
                self.lib.impl(name, getattr(E, name).default, "CPU")
        return self

    def __exit__(self, *exc):
        self.lib._destroy()


@pytest.fixture
def backend(request):
    """A cuda_backends() parameter as a Backend (for the emulated one, with the knobs at their defaults)."""
    be = Backend(request.param)
    if not be.emulated:
        yield be
        return
    with emulated_knobs():
        yield be


@pytest.fixture
def route_public(backend):
    """For tests of the public API: on the emulated backend, torch.ops.fastconv on CPU tensors runs the
    emulated kernels while the test runs."""
    if not backend.emulated:
        yield
        return
    with route_fastconv_cpu_to_emulated():
        yield


@pytest.fixture
def device(request):
    """A devices.cpu_emulated_and_cuda() parameter: the torch device of the test's tensors. "emulated" is
    the CPU with torch.ops.fastconv routed to the emulated CUDA kernels (knobs at their defaults)."""
    if request.param != "emulated":
        yield request.param
        return
    with emulated_knobs(), route_fastconv_cpu_to_emulated():
        yield "cpu"


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", cuda_backends(), indirect=True)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_large = pytest.mark.skip(reason="allocates past 2^31 elements; set FASTCONV_RUN_LARGE=1")
    skip_emulated = pytest.mark.skip(reason=str(EMULATED_MISSING))
    if EMULATED_MISSING and os.environ.get("FASTCONV_REQUIRE_EMULATED") == "1":
        raise pytest.UsageError(f"FASTCONV_REQUIRE_EMULATED=1 but {EMULATED_MISSING}")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "emulated_cuda" in item.keywords and EMULATED_MISSING:
            item.add_marker(skip_emulated)
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
