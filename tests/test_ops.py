"""The custom ops ``torch.ops.stochnorm_ext.*``: ``torch.library.opcheck`` on every op (schema,
fake tensor, autograd registration, AOT dispatch with dynamic shapes), the core ops'
semantics, double backward refusing clearly, and Conv -> layer -> ReLU models under
``torch.compile(fullgraph=True)`` matching eager.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import stochnorm_ext as sx

from conftest import available

pytestmark = pytest.mark.skipif(not available("cpu", "cpu"), reason="the C++ CPU backend is not available")

if available("cpu", "cpu"):
    from stochnorm_ext.backend.compiled.ops import ops
else:  # pragma: no cover
    ops = None


def _x(shape, fmt="contiguous", dtype=torch.float32, requires_grad=False, offset=0.0):
    t = torch.randn(shape, dtype=dtype) + offset
    if fmt == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    elif fmt == "noncontig":
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    return t.requires_grad_(requires_grad)


def _vec(n, dtype=torch.float32, requires_grad=False, positive=False):
    t = torch.randn(n, dtype=dtype)
    if positive:
        t = t.abs() + 0.5
    return t.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- samples per op
def samples_segment_stats():
    for shape, fmt, pieces in (((3, 4, 4, 4), "contiguous", 1), ((3, 4, 4, 4), "channels_last", 2),
                               ((5, 6), "contiguous", 1), ((2, 3, 2, 2, 4), "channels_last", 4),
                               ((2, 3, 8), "noncontig", 2)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            yield (_x(shape, fmt, dtype), pieces)
    yield (_x((3, 4, 4, 4), requires_grad=True, dtype=torch.float64), 2)


def samples_segment_apply():
    for shape, fmt, P in (((3, 4, 4, 4), "contiguous", 1), ((3, 4, 4, 4), "channels_last", 2),
                          ((5, 6), "contiguous", 1), ((2, 3, 6), "contiguous", 3)):
        for dtype in (torch.float32, torch.float16):
            C = shape[1]
            yield (_x(shape, fmt, dtype), torch.randn(C, P), torch.rand(C, P) + 0.5, torch.randn(C, P))
    C = 4
    yield (_x((3, C, 4, 4), requires_grad=True, dtype=torch.float64), _vec(C, torch.float64, True),
           _vec(C, torch.float64, True, positive=True), _vec(C, torch.float64, True))


def samples_segment_grad_sums():
    for shape, fmt, P in (((3, 4, 4, 4), "contiguous", 1), ((3, 4, 4, 4), "channels_last", 2),
                          ((5, 6), "contiguous", 1)):
        C = shape[1]
        yield (_x(shape, fmt), _x(shape, fmt), torch.randn(C, P))
    yield (_x((3, 4, 4, 4)), _x((3, 4, 4, 4), "channels_last"), torch.randn(4))  # dy in another layout


def samples_segment_grad_apply():
    for shape, fmt, P in (((3, 4, 4, 4), "contiguous", 1), ((3, 4, 4, 4), "channels_last", 4),
                          ((5, 6), "contiguous", 1)):
        C = shape[1]
        yield (_x(shape, fmt), _x(shape, fmt), *(torch.randn(C, P) for _ in range(4)))


def _stats_state(n, dtype=torch.float32, momentum=0.1, counted=True):
    """running_mean, running_var, momentum, num_batches_tracked of one statistics-op call."""
    nbt = torch.tensor(3) if counted else None
    return _vec(n, dtype), _vec(n, dtype, positive=True), momentum, nbt


def samples_stoch_norm_stats():
    C = 5
    for shape, fmt in (((4, C, 3, 3), "contiguous"), ((4, C, 3, 3), "channels_last"), ((6, C), "contiguous"),
                       ((3, C, 4), "noncontig")):
        for momentum, update in ((0.1, True), (None, True), (0.1, False)):
            rm, rv, momentum, nbt = _stats_state(C, momentum=momentum)
            yield (_x(shape, fmt, requires_grad=True), rm, rv, torch.rand(C) < 0.5, momentum, nbt, update)
    rm, rv, _, _ = _stats_state(C)  # bfloat16 input, float32 running statistics, no step count
    yield (_x((4, C, 3, 3), dtype=torch.bfloat16), rm, rv, torch.rand(C) < 0.5, 0.1, None, True)


def samples_batch_group_norm_stats():
    C = 6
    for shape, fmt, G in (((4, C, 4, 4), "contiguous", 2), ((4, C, 4, 4), "channels_last", 12),
                          ((4, C, 4, 4), "contiguous", 1), ((6, C, 2), "contiguous", 6)):
        rm, rv, momentum, nbt = _stats_state(G, momentum=None if G == 12 else 0.2)
        yield (_x(shape, fmt, requires_grad=True), G, rm, rv, momentum, nbt, True)
    yield (_x((4, C, 4, 4), dtype=torch.float64), 3, None, None, 0.1, None, False)  # no running statistics
    rm, rv, _, _ = _stats_state(3, torch.float64)  # float64 running statistics with float32 input
    yield (_x((4, C, 4, 4)), 3, rm, rv, 0.1, None, True)


def samples_cross_iteration_norm_stats():
    C = 5
    for fmt, K, running in (("contiguous", 2, True), ("channels_last", 0, True), ("channels_last", 3, False)):
        rm, rv, momentum, nbt = _stats_state(C) if running else (None, None, 0.1, None)
        yield (_x((4, C, 3, 3), fmt, requires_grad=True), rm, rv, torch.randn(K, C), torch.rand(K, C) + 0.5,
               torch.rand(K, C) < 0.6, momentum, nbt, running)


def _stat_tables(G, dtype=torch.float32, red=True):
    return (torch.randn(G, dtype=dtype), torch.rand(G, dtype=dtype) + 0.5,
            torch.full((G,), 0.05, dtype=dtype) if red else None)


def samples_norm_apply():
    for shape, fmt, G in (((4, 6, 4, 4), "contiguous", 6), ((4, 6, 4, 4), "channels_last", 2),
                          ((4, 6, 4, 4), "channels_last", 12), ((6, 6), "contiguous", 3), ((3, 6, 4), "noncontig", 6)):
        C = shape[1]
        for affine, red in ((True, True), (False, False)):
            yield (_x(shape, fmt, requires_grad=True), _vec(C, requires_grad=True) if affine else None,
                   _vec(C, requires_grad=True) if affine else None, *_stat_tables(G, red=red), G, 1e-5)
    yield (_x((4, 6, 4, 4), dtype=torch.float16, requires_grad=True), _vec(6, torch.float16, True),
           _vec(6, torch.float16, True), *_stat_tables(3), 3, 1e-5)


def samples_norm_backward():
    for shape, fmt, G in (((4, 6, 4, 4), "contiguous", 6), ((4, 6, 4, 4), "channels_last", 2),
                          ((4, 6, 4, 4), "channels_last", 12), ((6, 6), "contiguous", 1)):
        C = shape[1]
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            for weight, red in ((_vec(C), True), (None, False)):
                yield (_x(shape, fmt), _x(shape, fmt), weight, *_stat_tables(G, red=red), G, 1e-5, mask)


def _cbn_window(K, C, G, I, dtype=torch.float32):
    """The fields of a CBNWindow with random contents (cbn_window.CBNWindow's order)."""
    return (torch.randn(K, C, dtype=dtype), torch.rand(K, C, dtype=dtype) + 0.1, torch.randn(K, G, I, dtype=dtype),
            torch.randn(K, C, I, dtype=dtype), torch.randn(K, C, dtype=torch.float64),
            torch.randn(K, C, dtype=torch.float64), torch.rand(K) < 0.7, torch.tensor(1), torch.tensor(4))


def samples_cbn_window_compensate():
    for K, C, G, dtype, burnin in ((3, 6, 1, torch.float32, 0), (2, 4, 2, torch.float64, 6)):
        mean, var, dmu, dvar, dmu_w, dvar_w, valid, head, step = _cbn_window(K, C, G, 18, dtype)
        yield (mean, var, dmu, dvar, dmu_w, dvar_w, valid, step, torch.randn(C, 2, 3, 3), 0.8, burnin)


def samples_cbn_window_store():
    for K, C, G, dtype, dots in ((3, 6, 1, torch.float32, False), (2, 4, 2, torch.float64, True)):
        given = (torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64)) if dots else (None, None)
        yield (*_cbn_window(K, C, G, 18, dtype), torch.randn(C, dtype=dtype), torch.rand(C, dtype=dtype),
               torch.randn(G, 2, 3, 3, dtype=dtype), torch.randn(C, 2, 3, 3, dtype=dtype), torch.randn(C, 2, 3, 3),
               *given, 0)


SAMPLES = {
    "segment_stats": samples_segment_stats,
    "segment_apply": samples_segment_apply,
    "segment_grad_sums": samples_segment_grad_sums,
    "segment_grad_apply": samples_segment_grad_apply,
    "stoch_norm_stats": samples_stoch_norm_stats,
    "batch_group_norm_stats": samples_batch_group_norm_stats,
    "cross_iteration_norm_stats": samples_cross_iteration_norm_stats,
    "norm_apply": samples_norm_apply,
    "norm_backward": samples_norm_backward,
    "cbn_window_compensate": samples_cbn_window_compensate,
    "cbn_window_store": samples_cbn_window_store,
}


def test_every_op_has_samples():
    """A new op of csrc/ops.cpp must get opcheck samples here (the Triton backend's own
    ``triton_*`` ops in the namespace are checked with that backend)."""
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("stochnorm_ext::")}
    # (private ops, "_" prefix, are not part of the contract: _device_launches is tested below)
    schemas = {name for name in schemas if not name.startswith(("triton_", "_"))}
    assert schemas == set(SAMPLES), schemas ^ set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    op = getattr(torch.ops.stochnorm_ext, name).default
    for args in SAMPLES[name]():
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- core semantics
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_segment_stats_and_apply(fmt, pieces):
    """Segments are pieces of each channel's flattened positions, in logical order."""
    N, C, H, W = 3, 5, 4, 3
    x = _x((N, C, H, W), fmt, torch.float64)
    mean, m2 = ops.segment_stats(x, pieces)
    # (C, pieces, values): piece p of channel c over every sample
    segs = x.permute(1, 0, 2, 3).reshape(C, N, pieces, -1).transpose(1, 2).reshape(C, pieces, -1)
    torch.testing.assert_close(mean, segs.mean(-1))
    torch.testing.assert_close(m2, ((segs - segs.mean(-1, keepdim=True)) ** 2).sum(-1))
    center, scale, shift = torch.randn(C, pieces, dtype=torch.float64), torch.rand(C, pieces, dtype=torch.float64), \
        torch.randn(C, pieces, dtype=torch.float64)
    y = ops.segment_apply(x, center, scale, shift)
    xs = x.reshape(N, C, pieces, -1)
    want = ((xs - center[None, :, :, None]) * scale[None, :, :, None] + shift[None, :, :, None]).reshape(x.shape)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(x)
    sum_dy, sum_dy_xc = ops.segment_grad_sums(dy, x, center)
    dys = dy.reshape(N, C, pieces, -1)
    torch.testing.assert_close(sum_dy, dys.sum((0, 3)))
    torch.testing.assert_close(sum_dy_xc, (dys * (xs - center[None, :, :, None])).sum((0, 3)))
    k = [torch.randn(C, pieces, dtype=torch.float64) for _ in range(3)]
    dx = ops.segment_grad_apply(dy, x, center, *k)
    want = (k[0][None, :, :, None] * dys + k[1][None, :, :, None] * (xs - center[None, :, :, None])
            + k[2][None, :, :, None]).reshape(x.shape)
    torch.testing.assert_close(dx, want)


def test_core_ops_are_differentiable():
    """segment_stats and segment_apply compose (e.g. a distributed BN) with autograd."""
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    center = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.segment_stats(x, 2), (x,))
    assert torch.autograd.gradcheck(ops.segment_apply, (x, center, scale, shift))


# ----------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("kind", ["stoch", "bgn", "cbn"])
def test_double_backward_raises(kind):
    C = 4
    x = torch.randn(3, C, 3, 3, dtype=torch.float64, requires_grad=True)
    if kind == "stoch":
        m = sx.StochNorm2d(C, backend="cpu").double()
    elif kind == "bgn":
        m = sx.BatchGroupNorm2d(C, num_groups=2, backend="cpu").double()
    else:
        m = sx.CrossIterationBatchNorm2d(C, window=1, backend="cpu").double()
    y = m(x)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_double_backward_through_functional_raises():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    y = sx.functional.batch_group_norm(x, 8, training=True, backend="cpu")
    (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.sum(), x)


# ----------------------------------------------------------------------------- torch.compile
class Block(nn.Module):
    def __init__(self, cin, cout, norm):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        if norm == "stoch":
            self.norm = sx.StochNorm2d(cout, p=0.5, backend="cpu")
        elif norm == "bgn":
            self.norm = sx.BatchGroupNorm2d(cout, num_groups=cout // 2, backend="cpu")
        elif norm == "bgn_mul":
            self.norm = sx.BatchGroupNorm2d(cout, num_groups=cout * 2, backend="cpu")
        elif norm == "cbn":
            self.norm = sx.CrossIterationBatchNorm2d(cout, window=3, burnin=1, backend="cpu").bind(self.conv)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


def _model(norms, seed=0):
    torch.manual_seed(seed)
    channels = [3] + [8] * len(norms)
    return nn.Sequential(*(Block(cin, cout, norm) for cin, cout, norm in zip(channels, channels[1:], norms)))


def _steps(model, inputs, seed):
    torch.manual_seed(seed)  # StochNorm's masks come from the global generator
    outs = []
    for x in inputs:
        x = x.clone().requires_grad_()
        y = model(x)
        y.sum().backward()
        outs.append((y.detach(), x.grad))
    return outs


ALL_LAYERS = ("stoch", "bgn", "bgn_mul", "cbn")


def test_compile_fullgraph_matches_eager():
    """Conv -> layer -> ReLU blocks of every layer (StochNorm, BGN of both kinds, CBN bound to
    its conv) compile with fullgraph=True (no graph break) and match eager over training steps
    (outputs, input and parameter gradients, running statistics, CBN window) and in eval.
    aot_eager keeps it fast; with inductor the layers match too (StochNorm's mask needs
    torch._inductor.config.fallback_random=True to draw the same numbers as eager)."""
    import torch._dynamo
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]
    eager = _model(ALL_LAYERS)
    compiled_model = _model(ALL_LAYERS)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    out_e = _steps(eager, inputs, seed=5)
    out_c = _steps(compiled, inputs, seed=5)
    for (ye, ge), (yc, gc) in zip(out_e, out_c):
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
    for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5, msg=name)
    se, sc = eager.state_dict(), compiled_model.state_dict()
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-4, atol=1e-5, msg=k)
    compiled_model.eval()
    eager.eval()
    torch.testing.assert_close(compiled(inputs[0]), eager(inputs[0]), rtol=1e-4, atol=1e-5)
