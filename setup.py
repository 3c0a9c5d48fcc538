"""Build fastconv's C++/CUDA extension (``fastconv._C``).

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against the
torch that is already installed (build isolation would hide it or fetch another one).

Environment switches:
  FASTCONV_FORCE_CPU=1     build the C++ CPU kernels only, even if torch and nvcc could build CUDA
  FASTCONV_FORCE_CUDA=1    fail unless the CUDA kernels are built
  FASTCONV_EMULATED=0      skip fastconv._C_emulated: the CUDA kernels' sources compiled for the CPU
                           (a test tool, built by default because it takes under a minute; see
                           csrc/cuda/backend.cuh)
  FASTCONV_EMULATED_SANITIZE=1  build only fastconv._C_emulated, with AddressSanitizer and
                           UndefinedBehaviorSanitizer (scripts/test_emulated_asan.sh; load it with
                           LD_PRELOAD of libasan and libubsan)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default without a visible GPU: "8.0;9.0+PTX")
  MAX_JOBS                 parallel compile jobs (default: from cores and free memory)
  CUDA_HOME                the CUDA toolkit (default: /usr/local/cuda when it holds nvcc)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    # torch guesses CUDA_HOME from the directory of `nvcc` on PATH; a wrapper script such as
    # /usr/local/bin/nvcc makes it guess /usr/local, and linking then fails (-lcudart not found).
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


_cuda_home = _find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

FORCE_CPU = _flag("FASTCONV_FORCE_CPU")
FORCE_CUDA = _flag("FASTCONV_FORCE_CUDA")
if FORCE_CPU and FORCE_CUDA:
    sys.exit("fastconv: FASTCONV_FORCE_CPU and FASTCONV_FORCE_CUDA are both set; choose one")


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda():
    """CUDA kernels are built whenever torch is a CUDA build and a toolkit is found.

    Deliberately NOT gated on torch.cuda.is_available(): build machines and CI have no GPU.
    """
    if FORCE_CPU:
        return False, "FASTCONV_FORCE_CPU=1"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        reasons.append("no CUDA toolkit (nvcc) found; set CUDA_HOME")
    if reasons:
        if FORCE_CUDA:
            sys.exit("fastconv: FASTCONV_FORCE_CUDA=1 but " + "; ".join(reasons))
        return False, "; ".join(reasons)
    nvcc = _nvcc_version(CUDA_HOME)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc is None:
        sys.exit(f"fastconv: could not read the version of {CUDA_HOME}/bin/nvcc")
    if nvcc[0] != torch_major:
        sys.exit(
            f"fastconv: nvcc {nvcc[0]}.{nvcc[1]} (CUDA_HOME={CUDA_HOME}) and torch's CUDA "
            f"{torch.version.cuda} differ in major version; install a toolkit of CUDA {torch_major}.x, "
            "point CUDA_HOME at it, or build CPU-only with FASTCONV_FORCE_CPU=1"
        )
    return True, f"nvcc {nvcc[0]}.{nvcc[1]} at {CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _nvidia_pip_includes():
    # ATen's CUDA headers include cusparse.h etc.; some toolkits lack them while the `nvidia`
    # pip packages installed with torch carry them.
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    out = []
    for d in dirs:
        if os.path.isdir(d) and d not in out:
            out.append(d)
    return out


def _default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # ~3 GiB per nvcc job
    except (OSError, AttributeError):
        by_mem = cores
    return str(max(1, min(cores, by_mem)))


def _version():
    # one version string: fastconv/__init__.py's __version__
    with open(os.path.join(ROOT, "fastconv", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


TRAIN_EXTRAS = ["tqdm", "matplotlib"]
TEST_EXTRAS = TRAIN_EXTRAS + ["pytest", "hypothesis", "ruff", "clang-format", "onnx", "onnxscript", "onnxruntime"]


def extensions():
    with_cuda, why = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for (C++20 since torch 2.10)
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        if not os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
            include_dirs += _nvidia_pip_includes()
        define_macros.append(("FASTCONV_WITH_CUDA", None))
        ext = CUDAExtension(
            "fastconv._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "fastconv._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    exts = [ext]
    emulated = os.environ.get("FASTCONV_EMULATED", "1").strip().lower() not in ("0", "false", "no", "off")
    if emulated:
        exts.append(emulated_extension())
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    print("fastconv build configuration:")
    print(f"  torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels     {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        print(f"  TORCH_CUDA_ARCH_LIST {os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default: visible GPUs)')}")
    print(f"  MAX_JOBS         {os.environ['MAX_JOBS']}")
    print(f"  sources          {' '.join(sources)}")
    print(f"  emulated CUDA    {'yes (fastconv._C_emulated)' if emulated else 'no (FASTCONV_EMULATED=0)'}")
    return exts


EMULATED_SOURCES = sorted(glob.glob(os.path.join("csrc", "emulated", "*.cpp")))
EMULATED_CXX = ["-O2", "-DFASTCONV_EMULATE_CUDA"]


# -fno-wrapv: Python's CFLAGS carry -fwrapv, which would hide signed overflow from UBSan.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-fno-wrapv"]


def emulated_extension(sanitize=False):
    """fastconv._C_emulated: csrc/cuda/*.cu compiled by the host compiler (-DFASTCONV_EMULATE_CUDA),
    registering torch.ops.fastconv_emulated.* for CPU tensors. No CUDA toolkit needed."""
    return CppExtension(
        "fastconv._C_emulated", EMULATED_SOURCES, include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": EMULATED_CXX + (SANITIZE + ["-g", "-O1"] if sanitize else [])},
        extra_link_args=SANITIZE if sanitize else [],
    )


def ext_modules():
    if _flag("FASTCONV_EMULATED_SANITIZE"):
        os.environ.setdefault("MAX_JOBS", _default_max_jobs())
        print("fastconv build configuration: fastconv._C_emulated only, with ASan + UBSan")
        return [emulated_extension(sanitize=True)]
    return extensions()


setup(
    name="fastconv",
    version=_version(),
    description="im2col+GEMM conv2d and max_pool2d kernels (CPU and CUDA) for PyTorch",
    packages=find_packages(include=["fastconv", "fastconv.*"]),
    ext_modules=ext_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    # fastconv[train]: the training CLI's progress bars and plots; fastconv[test]: the test suite, ruff,
    # and the ONNX export test's exporter and runtime
    extras_require={"train": TRAIN_EXTRAS, "test": TEST_EXTRAS},
    entry_points={"console_scripts": ["fastconv-train=fastconv.train:main"]},
)
