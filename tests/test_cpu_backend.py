"""The C++ CPU backend (``csrc/cpu/``) against ``stochnorm_ext.reference`` (the executable docs/SPEC.md).

The tests shared with the CUDA backend live in tests/cpp_backend_suite*.py (every layer,
dtype, memory format and a set of edge shapes; module state over several steps; gradcheck;
offset data; the core ops; fuzzed shapes): they are imported here and run with the ``cpu``
backend on CPU tensors through the ``device`` fixture below. Here besides: the default
backend of CPU tensors and the portable (non-AVX2) kernel build.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext.backend import resolve

from conftest import available
from cpp_backend_suite import *  # noqa: F401,F403  (the shared tests, collected from this module)

pytestmark = pytest.mark.skipif(not available("cpu", "cpu"), reason="the C++ CPU backend is not available")


@pytest.fixture(scope="module")
def device():
    """The device of the shared tests: the cpu backend runs on CPU tensors."""
    return "cpu"


def test_module_default_backend_is_cpu():
    assert sx.backends()["cpu"] is None
    from stochnorm_ext import backend as registry
    from stochnorm_ext.backend import compiled as _backend_cpu
    assert resolve(None, torch.device("cpu")) is _backend_cpu or os.environ.get(registry.ENV_VAR)


# ----------------------------------------------------------------------------- portable kernels
_PORTABLE_SCRIPT = r"""
import torch, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import cpp_backend_suite as t
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
for layer in t.LAYERS:
    for shape, fmt in (((4, 3, 5, 5), "contiguous"), ((2, 17, 4, 4), "channels_last"), ((6, 7), "contiguous")):
        if layer == "cbn" and len(shape) != 4 or layer == "bgn_mul" and len(shape) == 2:
            continue
        for dtype in (torch.float64, torch.bfloat16):
            t.compare("cpu", layer, shape, dtype, fmt)
print("ok")
"""


def test_portable_kernel_build():
    """The non-AVX2 build of the kernels (ATEN_CPU_CAPABILITY=default selects it, as for ATen)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = _PORTABLE_SCRIPT.format(tests=tests_dir, repo=os.path.dirname(tests_dir))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tests_dir)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
