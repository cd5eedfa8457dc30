"""The triton provider's host side and packaging: launch planning, the package without
Triton, where its kernels live, what torch's triton_op finds, kernel signatures, and every
kernel variant compiled for a real GPU (no GPU needed)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import stochnorm_ext as sx

from conftest import available
from test_triton_backend import device_param

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def T_module():
    from stochnorm_ext.backend import triton
    return triton


# ---------------------------------------------------------------------------------------
# Host-side logic, packaging, compilation for a real GPU
# ---------------------------------------------------------------------------------------

def test_plan_fills_the_gpu_with_few_channels():
    T = T_module()
    """64 channels at batch 2 must not run on 64 programs: the reduction is split."""
    saved = dict(T.TUNING)
    T.TUNING.update(tile=1024, max_block_c=128, programs=8 * 132)
    try:
        for fmt in (torch.contiguous_format, torch.channels_last):
            plan = T.plan_for_shape((2, 64, 56, 56), fmt, 1, torch.device("cuda"))
            programs = plan.grid[0] * plan.grid[1]
            tiles = plan.grid[0] * plan.n * math.ceil(plan.piece_len / plan.block_i)
            assert programs >= min(4 * 132, tiles) and programs > 64, (fmt, plan.grid)
            covered = plan.splits * plan.tiles_per_split * plan.block_i
            assert covered >= plan.n * plan.piece_len
        # NCHW 56x56 rows are cut without a ragged, mostly empty last block
        plan = T.plan_for_shape((32, 256, 56, 56), torch.contiguous_format, 1, torch.device("cuda"))
        assert 3136 % plan.block_i < plan.block_i and math.ceil(3136 / plan.block_i) * plan.block_i <= 3136 * 1.07
        # more than 2**31 elements: the plan works in Python ints (the kernels in int64)
        plan = T.plan_for_shape((256, 64, 512, 512), torch.channels_last, 2, torch.device("cuda"))
        assert plan.grid[1] <= 65535 and plan.n * plan.s * plan.C > 2 ** 31
    finally:
        T.TUNING.clear()
        T.TUNING.update(saved)


def test_package_imports_without_triton():
    """stochnorm_ext and its triton provider import without triton; the backend then
    reports why it is unavailable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import stochnorm_ext as sx\n"
        "reason = sx.backends()['triton']\n"
        "assert reason and 'triton' in reason, reason\n"
        "from stochnorm_ext.backend import triton as T\n"
        "assert T.UNAVAILABLE and callable(sx.backends)\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_backend_runs_its_own_packages_kernels():
    """The backend launches the kernels of its own package (they live inside it), even where
    an editable install of another checkout is on the path."""
    from stochnorm_ext.backend.triton import grad_kernels, kernels, ops as op_module
    here = os.path.dirname(os.path.abspath(T_module().__file__))
    for module in (kernels, grad_kernels, op_module):
        assert os.path.dirname(os.path.abspath(module.__file__)) == here
    assert here == os.path.join(ROOT, "stochnorm_ext", "backend", "triton")


def test_triton_op_finds_every_kernel_of_its_op(monkeypatch):
    """torch's triton_op finds an op's kernels (its compile cache key) by reading the op's
    source, and the helpers it calls, for wrap_triton(<global name>): every kernel each op
    launches must be found. Under the interpreter the kernels are not JITFunctions, so
    torch's check for that type is pointed at the interpreter's for this test."""
    import triton.runtime.jit
    from torch._library.triton import get_inner_triton_kernels
    from stochnorm_ext.backend.triton import ops as op_module
    if op_module.INTERPRETED:
        monkeypatch.setattr(triton.runtime.jit, "JITFunction", type(op_module.segment_stats_kernel))
    want = {
        "stoch_norm_stats": {"segment_stats_kernel", "stoch_norm_finalize_kernel"},
        "batch_group_norm_stats": {"segment_stats_kernel", "batch_stats_finalize_kernel"},
        "cross_iteration_norm_stats": {"segment_stats_kernel", "cross_iteration_finalize_kernel"},
        "norm_apply": {"norm_apply_kernel"},
        "norm_backward": {"grad_reduce_kernel", "grad_finalize_kernel", "grad_apply_kernel"},
    }
    for name, kernels in want.items():
        found = get_inner_triton_kernels(getattr(op_module, name)._init_fn)
        assert {k.fn.__name__ for k in found} == kernels, name


def test_float_scalars_are_float64_kernel_arguments():
    """A Python float reaches a compiled kernel as a float32 scalar unless the parameter is
    annotated: every float scalar of every kernel is tl.float64 (the interpreter keeps
    Python floats as they are, so test_float64 cannot see this on a CPU)."""
    import inspect
    import triton.language as tl
    from stochnorm_ext.backend.triton import grad_kernels, kernels
    float_params = {"momentum", "unbias", "inv_count", "eps"}
    seen, count = set(), 0
    for module in (kernels, grad_kernels):
        for name in dir(module):
            fn = getattr(getattr(module, name), "fn", None)
            if not name.endswith("_kernel") or fn is None:
                continue
            count += 1
            for param in inspect.signature(fn).parameters.values():
                if param.name in float_params:
                    seen.add(param.name)
                    assert param.annotation is tl.float64, f"{name}({param.name}): {param.annotation!r}"
    assert seen == float_params and count == 8


@device_param
def test_outputs_are_poisoned_before_the_kernels_run(device, monkeypatch):
    from stochnorm_ext.backend.triton import launch
    monkeypatch.setenv(launch.POISON_ENV, "1")
    assert torch.isnan(launch.new(5, torch.float32, device)).all()
    monkeypatch.setenv(launch.POISON_ENV, "0")
    launch.new(5, torch.float32, device)  # no fill: nothing to check but that it runs


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not available("triton", "cpu") and not torch.cuda.is_available(),
                    reason="triton is not available")
def test_kernels_compile_for_sm90():
    """Every kernel specialisation the backend launches compiles (to a cubin, through
    ptxas) for sm_90 with this Triton, no GPU needed: the interpreter does not type-check
    like the compiler (this caught a loop-carried type change). Slow: minutes on 2 cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "stochnorm_ext.backend.triton.compile_check", "--quick"],
                         env=env, capture_output=True, text=True, timeout=880, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and ~20 GB of GPU memory)")
@pytest.mark.timeout(600)
def test_over_2_to_the_31_elements_cuda():
    """64-bit offsets: a bfloat16 input of more than 2**31 elements; the last channels
    are checked against PyTorch on a slice."""
    if torch.cuda.get_device_properties(0).total_memory < 30 * 2 ** 30:
        pytest.skip("not enough GPU memory")
    x = torch.randn(2 ** 31 // (16 * 4096) + 1, 16, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2 ** 31
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    y = sx.functional.stoch_norm(x, rm, rv, training=True, mask=torch.ones(16, dtype=torch.bool, device="cuda"),
                                 backend="triton")
    tail = x[:, -2:].float()
    var, mean = torch.var_mean(tail, dim=(0, 2, 3), correction=0)
    want = (tail - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1)
    assert (y[:, -2:].float() - want).abs().max().item() < 0.05


def test_a_layer_naming_triton_loads_it_when_built():
    """``import stochnorm_ext`` loads the Triton backend only where a default selection picks
    it (its op definitions import torch._inductor with torch 2.11); a layer built with
    ``backend="triton"`` loads it then, not at its first call, which torch.compile may be
    tracing."""
    code = ("import stochnorm_ext, torch; from stochnorm_ext import backend as b; "
            "before = 'triton' in b._loaded; stochnorm_ext.StochNorm2d(4, backend='triton'); "
            "print(before, 'triton' in b._loaded)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("STOCHNORM_EXT_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = out.stdout.split()[-2:]
    assert after == "True"
    if not torch.cuda.is_available():
        assert before == "False"
