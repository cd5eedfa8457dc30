"""The triton provider's ops against the op contract: schemas (opcheck), launches per op
(counted), output_mask, the step count, autograd and torch.compile (packaging and
compilation for a real GPU: test_triton_packaging.py). Kernels run under Triton's
interpreter on CPU tensors without a GPU (conftest sets TRITON_INTERPRET=1 and
STOCHNORM_EXT_POISON_OUTPUTS=1)."""
import contextlib
import math

import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext import reference

from test_triton_backend import device_param, small_tiles

pytestmark = pytest.mark.timeout(300)

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
    from stochnorm_ext.backend import triton
    return triton


def _launched(fn):
    with T_module().recording() as log:
        fn()
    return list(log)


@device_param
@pytest.mark.parametrize("tiles", ["default", "split"])
def test_launches_per_op(device, tiles):
    """stats op = stats kernel (which also counts the step) + 1 finalize; apply = 1;
    backward = reduce + finalize + apply, the first two only when a reduction is needed.
    Split reductions (several programs per channel) add no merge launch."""
    d = _inputs(device, shape=(3, 6, 4, 5))
    x, w, rm, rv, steps = d["x"], d["w"], d["rm"], d["rv"], d["steps"]
    overrides = {} if tiles == "default" else dict(tile=16, max_block_c=2, programs=8)
    with small_tiles(**overrides) if overrides else contextlib.nullcontext():
        fin = "{}_finalize_kernel".format
        counted = steps.item()
        assert _launched(lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"], 0.1, None, True)) == \
            [STATS, fin("stoch_norm")]
        assert _launched(lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"], None, steps, True)) == \
            [STATS, fin("stoch_norm")]
        assert _launched(lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"], None, steps, False)) == \
            [STATS, fin("stoch_norm")]
        assert _launched(lambda: ops.triton_batch_group_norm_stats(x, 3, rm[:3], rv[:3], 0.1, steps, True)) == \
            [STATS, fin("batch_stats")]
        assert _launched(lambda: ops.triton_batch_group_norm_stats(x, 12, None, None, 0.1, None, False)) == \
            [STATS, fin("batch_stats")]
        assert _launched(lambda: ops.triton_cross_iteration_norm_stats(x, rm, rv, *d["past"], 0.1, steps, True)) == \
            [STATS, fin("cross_iteration")]
        # one program of the (split) stats launch counted each of the three training calls
        assert steps.item() == counted + 3
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
    """Through the layer functions: a training forward is stats + finalize + apply,
    its backward reduce + finalize + apply; eval StochNorm and CBN are F.batch_norm (no
    Triton launch), eval BGN one apply."""
    T = T_module()
    d = _inputs(device)
    x = d["x"].clone().requires_grad_()
    w, b = d["w"].clone().requires_grad_(), d["b"].clone().requires_grad_()
    forward = [STATS, "stoch_norm_finalize_kernel", "norm_apply_kernel"]
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
    from stochnorm_ext.backend.triton import plan as P
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


@device_param
def test_torch_compile_fullgraph_cumulative_momentum(device):
    """The layer functions with momentum=None and the step count, compiled whole: the count
    is incremented and the cumulative factor read inside the ops (nothing read back to the
    host, so nothing breaks the graph); state matches eager after two steps."""
    T = T_module()

    def step(x, w, b, rm, rv, steps, mask):
        y = T.batch_group_norm(x, 12, w, b, rm[:12], rv[:12], True, None, 1e-5, True, steps)
        return T.stoch_norm(y, w, b, rm[12:], rv[12:], mask, True, None, 1e-5, True, steps)

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for fn in (compiled, step):
        torch.manual_seed(0)
        w = torch.rand(6, device=device, requires_grad=True)
        b = torch.randn(6, device=device, requires_grad=True)
        rm, rv = torch.randn(18, device=device), torch.rand(18, device=device) + 0.5
        steps = torch.tensor(2, device=device)
        for _ in range(2):
            x = torch.randn(4, 6, 3, 4, device=device, requires_grad=True)
            y = fn(x, w, b, rm, rv, steps, torch.arange(6, device=device) % 2 == 0)
            y.backward(torch.ones_like(y))
        results.append([t.detach().cpu() for t in (y, x.grad, w.grad, b.grad, rm, rv, steps)])
    assert int(results[0][-1]) == 6
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@device_param
def test_ops_refuse_what_would_crash_a_kernel(device):
    """Shapes and devices a kernel would read out of bounds with: a clear RuntimeError
    naming the op and the argument, raised before any state changes."""
    d = _inputs(device)
    x, rm, rv = d["x"], d["rm"], d["rv"]
    before = rm.clone(), rv.clone(), d["steps"].clone()
    cases = [
        (lambda: ops.triton_norm_apply(x, d["w"][:5], None, rm, rv, None, 6, 1e-5), "triton_norm_apply: weight"),
        (lambda: ops.triton_norm_apply(x, None, None, rm[:3], rv, None, 6, 1e-5), "triton_norm_apply: center"),
        (lambda: ops.triton_norm_backward(x, x, None, rm, rv[:2], None, 6, 1e-5, [True, True, True]),
         "triton_norm_backward: var"),
        (lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"][:5], 0.1, d["steps"], True), "mask"),
        (lambda: ops.triton_stoch_norm_stats(x, rm, rv, d["mask"].float(), 0.1, d["steps"], True), "bool"),
        (lambda: ops.triton_batch_group_norm_stats(x, 4, None, None, 0.1, None, False), "4 groups"),
        (lambda: ops.triton_cross_iteration_norm_stats(x, rm, rv, d["past"][0][:, :5], *d["past"][1:], 0.1,
                                                       d["steps"], True), "past_mean"),
        (lambda: ops.triton_batch_group_norm_stats(x[:1, :, :1, :1], 6, rm, rv, 0.1, d["steps"], True),
         "at least 2 values"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
        assert all(torch.equal(a, b) for a, b in zip((rm, rv, d["steps"]), before)), match
