"""The triton provider's ops against the op contract: schemas (opcheck), launches per op
(counted), output_mask, the step count, autograd, torch.compile, packaging and compilation
for a real GPU. Kernels run under Triton's interpreter on CPU tensors without a GPU
(conftest sets TRITON_INTERPRET=1 and STOCHNORM_EXT_POISON_OUTPUTS=1)."""
import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext import reference

from conftest import available
from test_triton_backend import device_param, small_tiles

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ops = torch.ops.stochnorm_ext


def _inputs(device, C=6, G=None, shape=(4, 6, 3, 2)):
    g = torch.Generator().manual_seed(0)
    G = G or C
    x = torch.randn(shape, generator=g).to(device)
    return dict(
        x=x, w=(torch.rand(C, generator=g) + 0.5).to(device), b=torch.randn(C, generator=g).to(device),
        rm=torch.randn(G, generator=g).to(device), rv=(torch.rand(G, generator=g) + 0.5).to(device),
        mask=(torch.arange(C) % 2 == 0).to(device), steps=torch.tensor(3, device=device),
        past=(torch.randn(2, C, generator=g).to(device), (torch.rand(2, C, generator=g) + 1).to(device),
              (torch.rand(2, C, generator=g) < 0.6).to(device)))


# ---------------------------------------------------------------------------------------
# Schemas: opcheck of every op (fake implementation, autograd registration, AOT dispatch)
# ---------------------------------------------------------------------------------------

def _op_samples(device):
    d = _inputs(device)
    x, w, b = d["x"], d["w"], d["b"]
    stats = (torch.randn(6, device=device), torch.rand(6, device=device) + 0.5, torch.rand(6, device=device))
    z, o = torch.zeros(6, device=device), torch.ones(6, device=device)
    return {
        "apply": (ops.triton_norm_apply.default,
                  (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), *stats, 6, 1e-5)),
        "apply-pieces": (ops.triton_norm_apply.default,
                         (x.clone().requires_grad_(), None, None, torch.randn(12, device=device),
                          torch.rand(12, device=device) + 0.5, None, 12, 1e-5)),
        "stoch-stats": (ops.triton_stoch_norm_stats.default, (x, z, o, d["mask"], 0.1, None, True)),
        "stoch-stats-cumulative": (ops.triton_stoch_norm_stats.default, (x, z, o, d["mask"], None, d["steps"], True)),
        "bgn-stats": (ops.triton_batch_group_norm_stats.default,
                      (x.to(memory_format=torch.channels_last), 3, z[:3], o[:3], 0.1, d["steps"], True)),
        "bgn-stats-no-running": (ops.triton_batch_group_norm_stats.default, (x, 12, None, None, 0.1, None, False)),
        "cbn-stats": (ops.triton_cross_iteration_norm_stats.default, (x, z, o, *d["past"], None, d["steps"], True)),
        "backward": (ops.triton_norm_backward.default, (torch.randn_like(x), x, w, *stats, 6, 1e-5, [True, True, True])),
        "backward-dx-only": (ops.triton_norm_backward.default,
                             (torch.randn_like(x), x, None, *stats[:2], None, 6, 1e-5, [True, False, False])),
        "backward-params-only": (ops.triton_norm_backward.default,
                                 (torch.randn_like(x), x, w, *stats, 6, 1e-5, [False, True, False])),
    }


OP_SAMPLES = list(_op_samples("cpu"))


@device_param
@pytest.mark.parametrize("name", OP_SAMPLES)
def test_opcheck(device, name):
    op, args = _op_samples(device)[name]
    torch.library.opcheck(op, args)


@device_param
def test_statistics_ops_are_not_differentiable_and_bump_versions(device):
    """Outputs never require grad (even for an input that does); the mutated running
    statistics and step count bump their version counters like any in-place op."""
    d = _inputs(device)
    x = d["x"].clone().requires_grad_()
    versions = [t._version for t in (d["rm"], d["rv"], d["steps"])]
    outs = ops.triton_stoch_norm_stats(x.detach(), d["rm"], d["rv"], d["mask"], None, d["steps"], True)
    assert not any(t.requires_grad for t in outs)
    assert all(t._version > v for t, v in zip((d["rm"], d["rv"], d["steps"]), versions))
    assert int(d["steps"]) == 4


# ---------------------------------------------------------------------------------------
# Launches per op, recorded by the one launch helper
# ---------------------------------------------------------------------------------------

STATS = "segment_stats_kernel"


def T_module():
    from stochnorm_ext.backends import triton
    return triton


def _launched(fn):
    with T_module().recording() as log:
        fn()
    return list(log)


@device_param
@pytest.mark.parametrize("tiles", ["default", "split"])
def test_launches_per_op(device, tiles):
    """stats op = stats kernel + 1 finalize (+1 step-count add_); apply = 1; backward =
    reduce + finalize + apply, the first two only when a reduction is needed. Split
    reductions (several programs per channel) add no merge launch."""
    d = _inputs(device, shape=(3, 6, 4, 5))
    x, w, rm, rv, steps = d["x"], d["w"], d["rm"], d["rv"], d["steps"]
    overrides = {} if tiles == "default" else dict(tile=16, max_block_c=2, programs=8)
    with small_tiles(**overrides) if overrides else contextlib.nullcontext():
        fin = "{}_finalize_kernel".format
        assert _launched(lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"], 0.1, None, True)) == \
            [STATS, fin("stoch_norm")]
        assert _launched(lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"], None, steps, True)) == \
            [STATS, "num_batches_tracked.add_", fin("stoch_norm")]
        assert _launched(lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"], None, steps, False)) == \
            [STATS, fin("stoch_norm")]
        assert _launched(lambda: ops.triton_batch_group_norm_stats(x, 3, rm[:3], rv[:3], 0.1, steps, True)) == \
            [STATS, "num_batches_tracked.add_", fin("batch_stats")]
        assert _launched(lambda: ops.triton_batch_group_norm_stats(x, 12, None, None, 0.1, None, False)) == \
            [STATS, fin("batch_stats")]
        assert _launched(lambda: ops.triton_cross_iteration_norm_stats(x, rm, rv, *d["past"], 0.1, steps, True)) == \
            [STATS, "num_batches_tracked.add_", fin("cross_iteration")]
        center, var, red = ops.triton_batch_group_norm_stats(x, 3, None, None, 0.1, None, False)
        assert _launched(lambda: ops.triton_norm_apply(x, w, d["b"], center, var, red, 3, 1e-5)) == \
            ["norm_apply_kernel"]
        dy = torch.randn_like(x)
        full = ["grad_reduce_kernel", "grad_finalize_kernel", "grad_apply_kernel"]
        for mask, r, want in [([True, True, True], red, full), ([True, False, False], red, full),
                              ([False, True, True], red, full[:2]), ([True, True, True], None, full),
                              ([True, False, False], None, full[2:]), ([False, False, False], red, [])]:
            got = _launched(lambda: ops.triton_norm_backward(dy, x, w, center, var, r, 3, 1e-5, mask))
            assert got == want, (mask, r is None)


@device_param
def test_launches_per_training_step(device):
    """Through the layer functions: a training forward is stats + finalize (+ add_) + apply,
    its backward reduce + finalize + apply; eval StochNorm and CBN are F.batch_norm (no
    Triton launch), eval BGN one apply."""
    T = T_module()
    d = _inputs(device)
    x = d["x"].clone().requires_grad_()
    w, b = d["w"].clone().requires_grad_(), d["b"].clone().requires_grad_()
    forward = [STATS, "num_batches_tracked.add_", "stoch_norm_finalize_kernel", "norm_apply_kernel"]
    with T.recording() as log:
        y = T.stoch_norm(x, w, b, d["rm"], d["rv"], d["mask"], True, None, 1e-5, True, d["steps"])
    assert log == forward
    with T.recording() as log:
        y.backward(torch.randn_like(y))
    assert log == ["grad_reduce_kernel", "grad_finalize_kernel", "grad_apply_kernel"]
    with T.recording() as log:
        T.stoch_norm(x, w, b, d["rm"], d["rv"], d["mask"], False, 0.1, 1e-5)
        T.cross_iteration_norm(x, w, b, d["rm"], d["rv"], *d["past"], False, 0.1, 1e-5)
    assert log == []
    with T.recording() as log:
        T.batch_group_norm(x, 6, w, b, d["rm"], d["rv"], False, 0.1, 1e-5)
    assert log == ["norm_apply_kernel"]


def test_bgn_grad_finalize_is_parallel_whatever_groups():
    """GPU blocks of the backward's finalize kernel with C = 2048 channels: one group (G = 1,
    2048 * splits partials) is reduced across thousands of lanes in a few steps, not by a
    loop over its channels (64 lanes: 32 steps per split); G = C still spreads over many
    programs; BGN's forward finalize uses the same blocking."""
    from stochnorm_ext.backends.triton import plan as P
    cuda = torch.device("cuda")
    for splits in (1, 66):
        grid, blocks = P.grad_finalize_blocks(2048, 1, 1, 2048, splits, cuda)
        steps = math.ceil(2048 * splits / blocks["BLOCK_P"])
        assert blocks["BLOCK_P"] >= 2048 and steps <= max(1, 2048 * splits // 4096), (splits, blocks)
        assert grid[0] >= 2048 // blocks["BLOCK_KC"] and blocks["BLOCK_KC"] <= 128
    grid, blocks = P.grad_finalize_blocks(2048, 2048, 1, 1, 4, cuda)
    assert grid[0] >= 16 and blocks["BLOCK_K"] <= 128
    assert P.small_blocks(1, 2048 * 4, cuda)[1] >= 2048  # forward finalize, G = 1


# ---------------------------------------------------------------------------------------
# norm_backward's output_mask and dtypes
# ---------------------------------------------------------------------------------------

@device_param
def test_norm_backward_output_mask(device):
    """An unrequested gradient is a zero-size tensor; the requested ones equal the full
    call's; parameter gradients come in the weight's dtype (the statistics' without one)."""
    d = _inputs(device, G=3)
    x, dy = d["x"], torch.randn_like(d["x"])
    center, var, red = ops.triton_batch_group_norm_stats(x, 3, None, None, 0.1, None, False)
    full = ops.triton_norm_backward(dy, x, d["w"].double(), center, var, red, 3, 1e-5, [True, True, True])
    assert full[1].dtype == full[2].dtype == torch.float64 and full[0].dtype == x.dtype
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        got = ops.triton_norm_backward(dy, x, d["w"].double(), center, var, red, 3, 1e-5, mask)
        for want, g, asked in zip(full, got, mask):
            assert torch.equal(g, want) if asked else g.numel() == 0
    got = ops.triton_norm_backward(dy, x, None, center, var, red, 3, 1e-5, [False, True, True])
    assert got[1].dtype == center.dtype and not torch.isnan(got[2]).any()


@device_param
def test_double_backward_raises(device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True)
    y = sx.functional.batch_group_norm(x, 3, weight=w, training=True, backend="triton")
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


def test_passes_are_the_reference_passes():
    """Distributed sync calls impl.PASSES: this provider has no passes of its own."""
    T = T_module()
    if hasattr(reference, "PASSES"):
        assert T.PASSES is reference.PASSES
    else:  # before reference.PASSES exists the attribute is missing, not an import error
        assert not hasattr(T, "PASSES")


@device_param
def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) of a training step: same output, gradients and
    running statistics as eager. On CUDA the ops are triton_ops and inductor sees the
    kernels; under the interpreter they are opaque custom ops (wrap_triton cannot trace
    interpreted kernels), compiled here with the aot_eager backend to keep it quick."""
    sx.backends()  # load the backend outside the compiled region (resolve() imports lazily)

    def step(x, w, b, rm, rv, mask):
        y = sx.functional.batch_group_norm(x, 3, rm[:3], rv[:3], w, b, training=True, backend="triton")
        return sx.functional.stoch_norm(y, rm, rv, w, b, training=True, mask=mask, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for fn in (compiled, step):
        torch.manual_seed(0)
        x = torch.randn(4, 6, 3, 3, device=device, requires_grad=True)
        w = torch.rand(6, device=device, requires_grad=True)
        b = torch.randn(6, device=device, requires_grad=True)
        rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
        y = fn(x, w, b, rm, rv, torch.arange(6, device=device) % 2 == 0)
        y.backward(torch.ones_like(y))
        results.append([t.detach().cpu() for t in (y, x.grad, w.grad, b.grad, rm, rv)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


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
        "from stochnorm_ext.backends import triton as T\n"
        "assert T.UNAVAILABLE and callable(sx.backends)\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_backend_runs_its_own_packages_kernels():
    """The backend launches the kernels of its own package (they live inside it), even where
    an editable install of another checkout is on the path."""
    from stochnorm_ext.backends.triton import grad_kernels, kernels, ops as op_module
    here = os.path.dirname(os.path.abspath(T_module().__file__))
    for module in (kernels, grad_kernels, op_module):
        assert os.path.dirname(os.path.abspath(module.__file__)) == here
    assert here == os.path.join(ROOT, "stochnorm_ext", "backends", "triton")


def test_triton_op_finds_every_kernel_of_its_op(monkeypatch):
    """torch's triton_op finds an op's kernels (its compile cache key) by reading the op's
    source, and the helpers it calls, for wrap_triton(<global name>): every kernel each op
    launches must be found. Under the interpreter the kernels are not JITFunctions, so
    torch's check for that type is pointed at the interpreter's for this test."""
    import triton.runtime.jit
    from torch._library.triton import get_inner_triton_kernels
    from stochnorm_ext.backends.triton import ops as op_module
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
    from stochnorm_ext.backends.triton import grad_kernels, kernels
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
    from stochnorm_ext.backends.triton import launch
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
    out = subprocess.run([sys.executable, "-m", "stochnorm_ext.backends.triton.compile_check", "--quick"],
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
