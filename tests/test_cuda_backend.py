"""The CUDA C++ backend (``csrc/cuda/``) against ``stochnorm_ext.reference`` (the executable docs/SPEC.md).

The tests shared with the CPU backend live in tests/cpp_backend_suite*.py (every layer,
dtype, memory format -- misaligned by a storage offset too, so that the kernels take their
scalar path -- and edge shapes, long rows that the kernels split over many blocks; module
state over several steps; gradcheck; offset data; the core ops; fuzzed shapes): they are
imported here and run with the ``cuda`` backend on CUDA tensors through the ``device``
fixture below. tests/test_cpu_backend.py runs the same tests on the CPU backend, which also
checks the tests themselves on a machine without a GPU. Here besides, on a GPU: opcheck on
the CUDA kernels of every op, dispatch and device checks, streams and devices,
torch.compile, and one tensor past 2^31 elements (only with enough free memory).

Without a CUDA device (or without the CUDA kernels) these tests skip with the reason, except
``test_backend_availability_matches_the_build`` and ``test_walk_check_on_host``, which
compiles ``csrc/cuda/tests/walk_check.cpp`` with the host compiler and replays the kernels'
work split and per-thread arithmetic on the CPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext.backend import resolve

from conftest import available
from cpp_backend_suite import *  # noqa: F401,F403  (the shared tests, collected from this module)
from cpp_backend_helpers import make_case, rel_err, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not available("cuda", "cuda"):
        return f"the cuda backend is not available: {sx.backends()['cuda']}"
    return None


_SKIP = _skip_reason()
gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture(scope="module")
def device():
    """The device of the shared tests: the cuda backend runs on CUDA tensors."""
    if _SKIP is not None:
        pytest.skip(_SKIP)
    return "cuda"


# ----------------------------------------------------------------------------- ops, dispatch
def _to_cuda(arg):
    if isinstance(arg, torch.Tensor):
        return arg.detach().cuda().requires_grad_(arg.requires_grad)
    return arg


@gpu
def test_opcheck_on_device():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on the
    CUDA kernels of every op, with the samples of tests/test_ops.py (which checks the CPU
    kernels with them) moved to the GPU."""
    from test_ops import SAMPLES
    for name in sorted(SAMPLES):
        op = getattr(torch.ops.stochnorm_ext, name).default
        for args in SAMPLES[name]():
            torch.library.opcheck(op, tuple(_to_cuda(a) for a in args))


@gpu
def test_every_op_has_a_cuda_kernel():
    from stochnorm_ext.backend.compiled import cuda as _backend_cuda
    assert _backend_cuda.UNAVAILABLE is None
    for name in _backend_cuda.CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stochnorm_ext::{name}", "CUDA"), name


def test_backend_availability_matches_the_build():
    """The cuda backend is compiled in exactly when the extension has CUDA kernels, and usable
    when besides a GPU is visible; ``backends()`` tells the two apart (CI: compiled in, no GPU)."""
    from stochnorm_ext.backend.compiled import cuda as _backend_cuda
    reason = sx.backends()["cuda"]
    try:
        from stochnorm_ext.backend.compiled import ops  # noqa: F401
    except ImportError:
        assert _backend_cuda.UNAVAILABLE and reason == _backend_cuda.UNAVAILABLE
        return
    has = [torch._C._dispatch_has_kernel_for_dispatch_key(f"stochnorm_ext::{n}", "CUDA")
           for n in _backend_cuda.CUDA_OPS]
    assert (_backend_cuda.UNAVAILABLE is None) == all(has)
    assert (reason is None) == (all(has) and torch.cuda.is_available()), reason
    if not all(has):
        assert "not compiled in" in reason, reason
    elif not torch.cuda.is_available():
        assert reason.startswith("compiled in, but not usable here: no CUDA device"), reason


@gpu
def test_default_backend_for_cuda_tensors():
    from stochnorm_ext import backend as registry
    from stochnorm_ext.backend.compiled import cuda as _backend_cuda
    if os.environ.get(registry.ENV_VAR):
        pytest.skip(f"{registry.ENV_VAR} overrides the default")
    assert resolve(None, torch.device("cuda")) is _backend_cuda


@gpu
def test_tensors_on_other_devices_are_refused():
    from stochnorm_ext.backend.compiled.ops import ops
    x = torch.randn(4, 3, 5, 5, device="cuda")
    table = torch.zeros(3)
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.segment_apply(x, table, table, table)
    with pytest.raises(RuntimeError, match="CUDA input"):
        ops.segment_apply(x.cpu(), table.cuda(), table.cuda(), table.cuda())
    with pytest.raises(RuntimeError, match="on cpu"):
        ops.cross_iteration_norm_stats(x, None, None, torch.zeros(1, 3), torch.ones(1, 3),
                                       torch.ones(1, 3, dtype=torch.bool, device="cuda"), 0.1, None, False)
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.stoch_norm_stats(x, torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"),
                             torch.ones(3, dtype=torch.bool), 0.1, None, True)
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.norm_apply(x, None, None, table, table.cuda(), None, 3, 1e-5)


@gpu
def test_side_stream():
    """The kernels run on the current stream: results on a side stream match the default one."""
    case = make_case("bgn_mul", (8, 16, 8, 8))
    want = run("bgn_mul", "cuda", case, torch.float32, "channels_last", "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run("bgn_mul", "cuda", case, torch.float32, "channels_last", "cuda")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for key in ("y", "grad_x", "grad_w", "grad_b", "running_mean", "running_var"):
        assert torch.equal(got[key], want[key]), key


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the ops switch device (CUDAGuard)."""
    case = make_case("stoch", (4, 8, 5, 5))
    got = run("stoch", "cuda", case, torch.float32, "channels_last", "cuda:1")
    want = run("stoch", "cuda", case, torch.float32, "channels_last", "cuda:0")
    assert got["y"].device == torch.device("cuda:1")
    for key in ("y", "grad_x", "grad_w", "running_var"):
        assert rel_err(got[key].cpu(), want[key].cpu()) < 1e-6, key


@gpu
def test_compile_fullgraph():
    """Conv -> StochNorm/BGN -> ReLU under torch.compile(fullgraph=True) matches eager on CUDA."""
    for norm in ("stoch", "bgn_mul"):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3, padding=1).cuda()
        layer = (sx.StochNorm2d(8, p=1.0, backend="cuda") if norm == "stoch"
                 else sx.BatchGroupNorm2d(8, num_groups=16, backend="cuda")).cuda()
        model = torch.nn.Sequential(conv, layer, torch.nn.ReLU())
        x = torch.randn(4, 3, 8, 8, device="cuda")
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- past 2^31 elements
def _free_gpu_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return free


BIG_GIB = 32


@gpu
@pytest.mark.slow
@pytest.mark.skipif(_free_gpu_bytes() < BIG_GIB * 2 ** 30, reason=f"needs {BIG_GIB} GiB of free GPU memory")
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_more_than_2_31_elements(fmt):
    """64-bit indexing: a float16 tensor of 2^31 + 2^15 elements through the four core ops, checked
    per channel against ATen (statistics) and at the end of the tensor (outputs)."""
    from stochnorm_ext.backend.compiled.ops import ops
    torch.manual_seed(0)
    C = 8
    if fmt == "contiguous":
        shape = (2, C, 2 ** 27 + 2 ** 11)           # planar rows of L values
    else:
        shape = (1, C, 2 ** 14, 2 ** 14 + 1)        # interleaved: channels innermost
    x = torch.empty(shape, dtype=torch.float16, device="cuda",
                    memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
    x.normal_()
    x += torch.arange(C, device="cuda", dtype=torch.float16).view(1, C, *([1] * (x.dim() - 2)))
    assert x.numel() > 2 ** 31
    mean, m2 = ops.segment_stats(x, 1)
    count = x.numel() // C
    for c in range(C):
        xc = x[:, c].float()
        var_c, mean_c = torch.var_mean(xc, correction=0)
        assert abs(mean[c, 0].item() - mean_c.item()) < 1e-4 * (abs(mean_c.item()) + 1)
        assert abs(m2[c, 0].item() / count - var_c.item()) < 1e-4 * var_c.item()
        del xc
    center, scale, shift = mean.view(C), torch.rsqrt(m2.view(C) / count + 1e-5), torch.linspace(-1, 1, C, device="cuda")
    y = ops.segment_apply(x, center, scale, shift)
    tail = (slice(None), slice(None)) + (slice(-3, None),) * (x.dim() - 2)
    per = lambda t: t.view(1, C, *([1] * (x.dim() - 2)))  # noqa: E731
    want_tail = ((x[tail].float() - per(center)) * per(scale) + per(shift)).half()
    torch.testing.assert_close(y[tail], want_tail, rtol=2e-3, atol=2e-3)
    del y
    dy = torch.ones_like(x)
    sum_dy, sum_dy_xc = ops.segment_grad_sums(dy, x, center)
    assert torch.allclose(sum_dy.view(C).double(), torch.full((C,), float(count), dtype=torch.float64, device="cuda"),
                          rtol=1e-5)
    assert sum_dy_xc.abs().max().item() < 1e-3 * count  # sum(x - mean) = 0 up to rounding
    dx = ops.segment_grad_apply(dy, x, center, scale, torch.zeros_like(scale), shift)
    want_tail = (per(scale) + per(shift)).expand_as(x[tail]).half()
    torch.testing.assert_close(dx[tail], want_tail, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- host check of the kernels' indexing
def test_walk_check_on_host(tmp_path):
    """csrc/cuda/tests/walk_check.cpp: the CUDA core's work split, indexing and per-thread
    arithmetic replayed on the CPU (no GPU needed)."""
    source = os.path.join(ROOT, "csrc", "cuda", "tests", "walk_check.cpp")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not os.path.exists(source) or compiler is None:
        pytest.skip("needs the repository's csrc/ and a C++ compiler")
    from torch.utils import cpp_extension
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    exe = str(tmp_path / "walk_check")
    build = subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                            *includes, source, f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", exe],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    result = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "all checks passed" in result.stdout, result.stdout[-4000:] + result.stderr


@gpu
@pytest.mark.parametrize("G", [1, 2, 6, 12])
def test_launches_per_op_on_device(G):
    """The launches of tests/test_op_contract.py::test_launches_per_op on the GPU, where each
    reduction pass may add one merge kernel when it splits its rows over several blocks (not
    at these small sizes: the counts are exact); the stats kernel counts the step."""
    from stochnorm_ext.backend.compiled.ops import defaults as ops
    from test_op_contract import launches
    C = 6
    x, dy = torch.randn(4, C, 4, 4, device="cuda"), torch.randn(4, C, 4, 4, device="cuda")
    rm, rv, nbt = torch.zeros(G, device="cuda"), torch.ones(G, device="cuda"), torch.tensor(0, device="cuda")
    stats, n = launches(ops.batch_group_norm_stats, x, G, rm, rv, None, nbt, True)
    assert n == 2 and nbt.item() == 1
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    _, n = launches(ops.norm_apply, x, w, b, *stats, G, 1e-5)
    assert n == 1
    _, n = launches(ops.norm_backward, dy, x, w, *stats, G, 1e-5, [True, True, True])
    assert n == 3
    big = torch.randn(2, 2, 1 << 20, device="cuda")  # long rows: the reductions split and merge
    _, n = launches(ops.batch_group_norm_stats, big, 1, None, None, 0.1, None, False)
    assert n == 3  # stats + merge + one coefficient step (G = 1, C = 2: one block reduction)
