"""Build stochnorm_ext and its compiled extension ``stochnorm_ext._C``.

The C++ op schemas and CPU kernels in ``csrc/`` are always built. CUDA sources
(``csrc/cuda/*.cu``) are built when nvcc and a CUDA build of torch are present;
``FORCE_CUDA=1`` requires them (and fails loudly without), ``FORCE_CUDA=0`` skips them.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0;9.0``).
Build with ``pip install --no-build-isolation .`` (the build needs the installed torch).
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# nvcc on this kind of machine may be a wrapper script in /usr/local/bin, from which torch
# would guess CUDA_HOME=/usr/local; point it at the real toolkit when nothing else says.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") \
        and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

# A C++ extension is tied to the torch it was compiled against: pin that minor version.
_TORCH = Version(torch.__version__.split("+")[0])
TORCH_REQUIREMENT = f"torch>={_TORCH.major}.{_TORCH.minor},<{_TORCH.major}.{_TORCH.minor + 1}"
if _TORCH < Version("2.11"):
    sys.exit(f"stochnorm_ext needs torch >= 2.11 to build, found {torch.__version__}")


def _read_version():
    """The single source of the version: ``__version__`` in stochnorm_ext/__init__.py."""
    with open(os.path.join(HERE, "stochnorm_ext", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("no __version__ in stochnorm_ext/__init__.py")


def _flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _cuda_wanted(cuda_sources):
    force = _flag("FORCE_CUDA")
    have_nvcc = cpp_extension.CUDA_HOME is not None
    have_cuda_torch = torch.version.cuda is not None
    if force is False:
        return False
    if force is True:
        if not (have_nvcc and have_cuda_torch):
            sys.exit("FORCE_CUDA=1 but the CUDA extension cannot be built: "
                     f"nvcc/CUDA_HOME {'found' if have_nvcc else 'not found'}, "
                     f"torch {torch.__version__} is {'a CUDA' if have_cuda_torch else 'a CPU-only'} build")
        return True
    return have_nvcc and have_cuda_torch and bool(cuda_sources)


def _nvidia_wheel_includes():
    """Headers of the nvidia-* wheels torch depends on (cuBLAS/cuSPARSE headers that
    ATen/cuda includes are missing from a minimal system CUDA)."""
    dirs = []
    try:
        import nvidia  # namespace package installed with CUDA torch wheels
        for root in list(nvidia.__path__):
            dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def extensions():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    cxx = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden"]
    define_macros = []
    extra_link = ["-fopenmp"]
    if _cuda_wanted(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # No --use_fast_math: it would flush denormals and approximate the divisions and
        # 1/sqrt of the statistics, outside the tolerances the kernels are tested with.
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        for inc in _nvidia_wheel_includes():
            nvcc += ["-isystem", inc]
            cxx += ["-isystem", inc]
        define_macros.append(("WITH_CUDA", None))
        return [cpp_extension.CUDAExtension(
            "stochnorm_ext._C", cpp_sources + cuda_sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)]
    return [cpp_extension.CppExtension(
        "stochnorm_ext._C", cpp_sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)]


setup(
    name="stochnorm_ext",
    version=_read_version(),
    description="Fused StochNorm, Batch Group Normalization and Cross-Iteration BatchNorm for PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    classifiers=["Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12",
                 "Programming Language :: C++", "Environment :: GPU :: NVIDIA CUDA"],
    packages=["stochnorm_ext", "stochnorm_ext.bench", "stochnorm_ext.triton_kernels"],
    package_dir={"stochnorm_ext": "stochnorm_ext", "stochnorm_ext.triton_kernels": "triton_kernels"},
    install_requires=[TORCH_REQUIREMENT],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis", "pytest-benchmark"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
