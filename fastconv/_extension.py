"""Loads the compiled extension ``fastconv._C`` and explains what to do when that fails."""
import torch

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` in the fastconv checkout"

try:
    from . import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)
except ImportError as e:  # not built, or built against another torch
    if "undefined symbol" in str(e):
        raise ImportError(
            f"fastconv's C++ extension was built against a different torch than the installed {torch.__version__}; "
            f"{_REBUILD} (original error: {e})"
        ) from e
    raise ImportError(f"fastconv's C++ extension (fastconv._C) is not built or failed to load; {_REBUILD} "
                      f"(original error: {e})") from e


def cuda_version():
    """CUDA version the extension was compiled with, as ``(major, minor)``, or ``None`` for a CPU-only build."""
    v = torch.ops.fastconv._cuda_version()
    return None if v < 0 else (v // 1000, (v % 1000) // 10)


def has_cuda_kernels():
    """Whether this build of fastconv has CUDA kernels for its ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastconv::conv2d", "CUDA") and cuda_version() is not None


def _check_cuda_version():
    built = cuda_version()
    if built is None or torch.version.cuda is None:
        return
    torch_major = int(torch.version.cuda.split(".")[0])
    if built[0] != torch_major:
        raise ImportError(
            f"fastconv was compiled with CUDA {built[0]}.{built[1]} but torch uses CUDA {torch.version.cuda}; "
            f"{_REBUILD}"
        )


_check_cuda_version()
