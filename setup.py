"""Build stochnorm_ext and its compiled extension ``stochnorm_ext._C``.

The C++ op schemas and CPU kernels in ``csrc/`` are always built. CUDA sources
(``csrc/cuda/*.cu``) are built when a GPU is visible here (``torch.cuda.is_available()``, or
``nvidia-smi`` lists one) and nvcc and a CUDA build of torch are present -- not merely because
nvcc is installed: compiling them takes minutes. ``FORCE_CUDA=1`` requires them (and fails
loudly without nvcc or a CUDA torch), ``FORCE_CUDA=0`` skips them.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0;9.0``).
Build with ``pip install --no-build-isolation .`` (the build needs the installed torch).

``python setup.py --build-plan`` prints, without building, a key of everything the compiled
extension depends on (sources, this file, the CUDA decision and flags, torch) and a line
saying what a build compiles; ``scripts/setup_venv.sh`` rebuilds only when the key changes.
"""
import glob
import hashlib
import os
import subprocess
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


def _gpu_visible():
    """Whether this machine has a GPU to run CUDA kernels on: torch sees one, or nvidia-smi
    (which works without a CUDA build of torch) lists one."""
    if torch.cuda.is_available():
        return True
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def _cuda_plan(cuda_sources):
    """(build the CUDA kernels?, why) -- FORCE_CUDA wins; else only where a GPU is visible."""
    force = _flag("FORCE_CUDA")
    have_nvcc = cpp_extension.CUDA_HOME is not None
    have_cuda_torch = torch.version.cuda is not None
    if force is False:
        return False, "FORCE_CUDA=0"
    if force is True:
        if not (have_nvcc and have_cuda_torch):
            sys.exit("FORCE_CUDA=1 but the CUDA extension cannot be built: "
                     f"nvcc/CUDA_HOME {'found' if have_nvcc else 'not found'}, "
                     f"torch {torch.__version__} is {'a CUDA' if have_cuda_torch else 'a CPU-only'} build")
        return True, "FORCE_CUDA=1"
    if not cuda_sources:
        return False, "no CUDA sources"
    if not _gpu_visible():
        return False, "no GPU is visible here; FORCE_CUDA=1 compiles them anyway"
    if not (have_nvcc and have_cuda_torch):
        return False, (f"a GPU is visible but nvcc {'is there' if have_nvcc else 'is missing'} and torch "
                       f"{torch.__version__} is {'a CUDA' if have_cuda_torch else 'a CPU-only'} build")
    return True, "a GPU is visible"


def _sources():
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    return cpp_sources, cuda_sources


def _arch_list():
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"


def build_plan():
    """(key, description): a hash of everything the compiled extension depends on, and what
    a build compiles, with a rough time on a 2-core machine (measured there)."""
    cpp_sources, cuda_sources = _sources()
    cuda, why = _cuda_plan(cuda_sources)
    what = f"the C++ CPU kernels ({len(cpp_sources)} files, ~1-3 min on 2 cores)"
    if cuda:
        archs = _arch_list().replace(";", " ").split()
        what += (f" and the CUDA kernels ({why}) for {', '.join('sm_' + a.replace('.', '') for a in archs)} "
                 f"(~{2 * len(archs)}-{3 * len(archs)} min more on 2 cores)")
    else:
        what += f"; not the CUDA kernels ({why})"
    digest = hashlib.sha256()
    digest.update(repr((torch.__version__, cuda, _arch_list() if cuda else None, cpp_extension.CUDA_HOME,
                        sys.version, _read_version())).encode())
    # Every file a compile may read: csrc/ but its host-side tests and notes.
    inputs = [path for path in sorted(glob.glob(os.path.join(HERE, "csrc", "**", "*"), recursive=True))
              if os.path.isfile(path) and not path.endswith(".md")
              and "tests" not in os.path.relpath(path, HERE).split(os.sep)]
    for path in [os.path.join(HERE, "setup.py"), os.path.join(HERE, "pyproject.toml")] + inputs:
        if os.path.isfile(path):
            digest.update(os.path.relpath(path, HERE).encode())
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest(), what


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
    cpp_sources, cuda_sources = _sources()
    cxx = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden"]
    define_macros = []
    extra_link = ["-fopenmp"]
    if _cuda_plan(cuda_sources)[0]:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
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


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext (ninja), saying first what it compiles and roughly how long it takes."""

    def run(self):
        print(f"stochnorm_ext: compiling {build_plan()[1]}", file=sys.stderr, flush=True)
        super().run()


if sys.argv[1:] == ["--build-plan"]:
    print("\n".join(build_plan()))
    sys.exit(0)

setup(
    name="stochnorm_ext",
    version=_read_version(),
    description="Fused StochNorm, Batch Group Normalization and Cross-Iteration BatchNorm for PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    classifiers=["Programming Language :: Python :: 3.11", "Programming Language :: Python :: 3.12",
                 "Programming Language :: C++", "Environment :: GPU :: NVIDIA CUDA"],
    packages=["stochnorm_ext", "stochnorm_ext.bench", "stochnorm_ext.backends", "stochnorm_ext.backends.triton"],
    install_requires=[TORCH_REQUIREMENT],
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis", "pytest-benchmark"],
                    # python -m stochnorm_ext.bench (matplotlib only for --plot)
                    "bench": ["numpy", "matplotlib"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
