"""The reference implementations (the executable form of docs/SPEC.md) against torch's own
BatchNorm and against independent formulations written here, plus gradcheck, numerics at
a large common offset and half precision.

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext import functional as SF
from stochnorm_ext.cbn_window import CBNWindow

from conftest import randomize_bn_

BACKEND = "reference"
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=3e-5, atol=3e-5)}

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
STOCH = {1: sx.StochNorm1d, 2: sx.StochNorm2d, 3: sx.StochNorm3d}
BGN = {1: sx.BatchGroupNorm1d, 2: sx.BatchGroupNorm2d, 3: sx.BatchGroupNorm3d}
SHAPES = [(7, 5), (4, 5, 7), (3, 5, 4, 3), (2, 5, 3, 2, 3)]


def _dims(shape):
    return max(len(shape) - 2, 1)


def _bshape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


def _rand_x(shape, dtype, offset=0.7, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)


def _randomize(m):
    return randomize_bn_(m, num_batches_tracked=3)


def _make_identity(kind, d, C, momentum):
    if kind == "stochnorm":
        return STOCH[d](C, p=1.0, momentum=momentum, backend=BACKEND)
    if kind == "bgn":
        return BGN[d](C, C, momentum=momentum, backend=BACKEND)
    return sx.CrossIterationBatchNorm2d(C, window=1, momentum=momentum, backend=BACKEND)


IDENTITY_CASES = [(k, s) for k in ("stochnorm", "bgn") for s in SHAPES] + [("cbn", SHAPES[2])]


def _sgd_(module, lr=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
            p.grad = None


# ------------------------------------------------------------------- identities vs nn.BatchNorm
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,shape", IDENTITY_CASES)
def test_identity_with_batchnorm_training(kind, shape, dtype, momentum):
    """StochNorm p=1, BGN G=C and CBN window 1 are BatchNorm: outputs, every gradient and
    the running statistics over several SGD steps (momentum None: cumulative average)."""
    d, C = _dims(shape), shape[1]
    bn = _randomize(BN[d](C, momentum=momentum)).to(dtype)
    layer = _make_identity(kind, d, C, momentum).to(dtype)
    layer.load_state_dict(bn.state_dict())  # BatchNorm's state dict loads as it is
    for step in range(3):
        x = _rand_x(shape, dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), bn(xb)
        assert ya.dtype == dtype and ya.shape == yb.shape
        torch.testing.assert_close(ya, yb, **TOL[dtype])
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
        torch.testing.assert_close(layer.weight.grad, bn.weight.grad, **TOL[dtype])
        torch.testing.assert_close(layer.bias.grad, bn.bias.grad, **TOL[dtype])
        _sgd_(layer)
        _sgd_(bn)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, **TOL[dtype])
        torch.testing.assert_close(layer.running_var, bn.running_var, **TOL[dtype])
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 4 + step
    # eval afterwards: BN eval with the (trained) buffers, nothing changes
    layer.eval()
    bn.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _rand_x(shape, dtype).requires_grad_()
    torch.testing.assert_close(layer(x), bn(x), **TOL[dtype])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cbn_window_bound_identity_before_burnin():
    """A bound CBN with window > 1 is still BatchNorm during its burn-in (nothing stored)."""
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    cbn = sx.CrossIterationBatchNorm2d(4, window=3, burnin=5, backend=BACKEND).double().bind(conv)
    bn = _randomize(nn.BatchNorm2d(4)).double()
    cbn.load_state_dict(bn.state_dict())
    for _ in range(3):
        inp = torch.randn(3, 3, 5, 5, dtype=torch.float64)
        h = conv(inp)
        ya, yb = cbn(h), bn(h.detach())
        torch.testing.assert_close(ya, yb, **TOL[torch.float64])
    assert not cbn.window_valid.any() and int(cbn.step) == 3


def _eval_layers(C, d):
    conv = nn.Conv2d(3, C, 3, padding=1)
    layers = [STOCH[d](C, p=0.5, backend=BACKEND), BGN[d](C, C, backend=BACKEND)]
    if d == 2:
        cbn = sx.CrossIterationBatchNorm2d(C, window=3, backend=BACKEND).bind(conv)
        with torch.no_grad():  # a non-empty window must be ignored (and kept) in eval
            cbn.window_mean.normal_()
            cbn.window_var.uniform_(0.5, 2)
            cbn.window_valid.fill_(True)
            cbn.step.fill_(7)
        layers += [cbn, sx.CrossIterationBatchNorm2d(C, window=1, backend=BACKEND)]
    return layers


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", SHAPES)
def test_eval_is_batchnorm_eval_and_changes_no_buffer(shape, momentum):
    d, C = _dims(shape), shape[1]
    for layer in _eval_layers(C, d):
        layer.momentum = momentum
        bn = _randomize(BN[d](C, momentum=momentum)).double().eval()
        layer.double()
        layer.load_state_dict(bn.state_dict(), strict=False)
        if isinstance(layer, sx.CrossIterationBatchNorm2d) and layer.bound_conv is not None:
            with torch.no_grad():
                layer.window_valid.fill_(True)
        layer.eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        for _ in range(2):
            x = _rand_x(shape, torch.float64)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = layer(xa), bn(xb)
            torch.testing.assert_close(ya, yb, **TOL[torch.float64])
            dy = torch.randn_like(ya)
            ya.backward(dy)
            yb.backward(dy)
            torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
            torch.testing.assert_close(layer.weight.grad, bn.weight.grad, **TOL[torch.float64])
            layer.zero_grad()
            bn.zero_grad()
        after = layer.state_dict()
        assert after.keys() == before.keys()
        for k, v in after.items():
            assert torch.equal(v, before[k]), (type(layer).__name__, k)


# ------------------------------------------------------------------- BGN: independent formulation
def _bgn_independent(x, G, w, b, rm, rv, training, momentum, eps=1e-5):
    """The paper's description, with torch's batch_norm doing the group statistics:
    (N, C, *S) -> (N, G, C*S/G), BatchNorm over G "channels", back, per-channel affine."""
    N = x.shape[0]
    z = F.batch_norm(x.reshape(N, G, -1), rm, rv, None, None, training, momentum, eps)
    return z.reshape(x.shape) * w.view(_bshape(x)) + b.view(_bshape(x))


BGN_CASES = [
    # (shape, G, memory format)
    ((4, 6, 3, 4), 3, "contiguous"), ((4, 6, 3, 4), 3, "channels_last"),
    ((4, 6, 3, 4), 1, "channels_last"), ((4, 6, 3, 4), 2, "contiguous"),
    ((4, 6, 3, 4), 12, "contiguous"), ((4, 6, 3, 4), 12, "channels_last"),
    ((4, 6, 3, 4), 18, "channels_last"), ((3, 4, 2, 3, 2), 8, "channels_last_3d"),
    ((3, 4, 2, 3, 2), 2, "channels_last_3d"), ((5, 6, 4), 3, "contiguous"),
    ((5, 6, 4), 24, "contiguous"), ((6, 8), 2, "contiguous"),
]
_MF = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
       "channels_last_3d": torch.channels_last_3d}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,G,fmt", BGN_CASES)
def test_bgn_matches_independent_reshape_formulation(shape, G, fmt, dtype):
    C, d = shape[1], _dims(shape)
    layer = BGN[d](C, G, momentum=0.3, backend=BACKEND).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.4 * torch.randn(C))
        layer.bias.copy_(0.3 * torch.randn(C))
        layer.running_mean.copy_(torch.randn(G))
        layer.running_var.copy_(0.5 + torch.rand(G))
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    for training in (True, True, False):
        layer.train(training)
        x = _rand_x(shape, dtype).contiguous(memory_format=_MF[fmt])
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = layer(xa)
        yb = _bgn_independent(xb, G, w, b, rm, rv, training, 0.3)
        assert ya.is_contiguous(memory_format=_MF[fmt]) and ya.dtype == dtype
        torch.testing.assert_close(ya, yb, **TOL[dtype])
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
        torch.testing.assert_close(layer.weight.grad, w.grad, **TOL[dtype])
        torch.testing.assert_close(layer.bias.grad, b.grad, **TOL[dtype])
        torch.testing.assert_close(layer.running_mean, rm, **TOL[dtype])
        torch.testing.assert_close(layer.running_var, rv, **TOL[dtype])
        layer.zero_grad()
        w.grad = b.grad = None


def test_bgn_pieces_follow_flattened_spatial_order():
    """G = 2C: the first half of each channel's flattened positions is one group. Build an
    input whose halves have very different scales and check the normalisation directly."""
    N, C, H, W = 3, 2, 2, 4
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    x[:, :, 0] = x[:, :, 0] * 10 + 50  # first row = first half of the 8 positions
    layer = sx.BatchGroupNorm2d(C, 2 * C, backend=BACKEND).double()
    y = layer(x)
    for c in range(C):
        for piece, rows in enumerate((slice(0, 1), slice(1, 2))):
            v = x[:, c, rows]
            want = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)
            torch.testing.assert_close(y[:, c, rows], want)
    assert layer.running_mean[0] > 4 and abs(float(layer.running_mean[1])) < 1  # (G,) = (c, piece)


def test_bgn_without_running_stats_uses_batch_stats_in_eval():
    x = _rand_x((4, 6, 3, 3), torch.float64)
    layer = sx.BatchGroupNorm2d(6, 3, track_running_stats=False, backend=BACKEND).double().eval()
    assert layer.running_mean is None
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(layer(x), _bgn_independent(x, 3, w, b, None, None, True, 0.0))


# ------------------------------------------------------------------- StochNorm: per channel
def _stoch_independent(x, w, b, rm, rv, mask, momentum, eps=1e-5):
    """Per channel: mask True -> BN training output; False -> BN with the running
    statistics snapshot taken BEFORE the update (the contract). Updates rm/rv like BN."""
    rm0, rv0 = rm.clone(), rv.clone()
    y_batch = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    y_moving = F.batch_norm(x, rm0, rv0, w, b, False, 0.0, eps)
    return torch.where(mask.view(_bshape(x)), y_batch, y_moving)


def _stoch_published(x, w, b, rm, rv, mask, momentum, eps=1e-5):
    """The published composition: moving branch on the live buffers, then the batch branch
    updates them in place (no snapshot)."""
    y_moving = F.batch_norm(x, rm, rv, w, b, False, 0.0, eps)
    y_batch = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    return torch.where(mask.view(_bshape(x)), y_batch, y_moving)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(3, 5, 4, 3, "channels_last")])
def test_stochnorm_per_channel_against_batchnorm(shape, dtype):
    fmt = torch.contiguous_format
    if shape[-1] == "channels_last":
        shape, fmt = shape[:-1], torch.channels_last
    C = shape[1]
    mask = torch.tensor([True, False, False, True, False])
    w = (1 + 0.4 * torch.randn(C, dtype=dtype)).requires_grad_()
    b = (0.3 * torch.randn(C, dtype=dtype)).requires_grad_()
    wb, bb = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    rm = (0.5 * torch.randn(C)).to(dtype)
    rv = (0.5 + torch.rand(C)).to(dtype)
    rm_b, rv_b = rm.clone(), rv.clone()
    rv_pre = rv.clone()
    x = _rand_x(shape, dtype).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = SF.stoch_norm(xa, rm, rv, w, b, training=True, momentum=0.4, mask=mask, backend=BACKEND)
    yb = _stoch_independent(xb, wb, bb, rm_b, rv_b, mask, 0.4)
    assert ya.dtype == dtype and ya.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(ya, yb, **TOL[dtype])
    torch.testing.assert_close(rm, rm_b, **TOL[dtype])
    torch.testing.assert_close(rv, rv_b, **TOL[dtype])
    assert not torch.allclose(rv, rv_pre)  # the update happened (for every channel)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
    torch.testing.assert_close(w.grad, wb.grad, **TOL[dtype])
    torch.testing.assert_close(b.grad, bb.grad, **TOL[dtype])
    # moving channels, analytically: dx = dy * gamma / sqrt(rv_pre + eps)
    moving = ~mask
    analytic = dy * (w.detach() / torch.sqrt(rv_pre + 1e-5)).view(_bshape(x))
    torch.testing.assert_close(xa.grad[:, moving], analytic[:, moving], **TOL[dtype])


def test_stochnorm_published_trap_gradient_differs():
    """The published two-call composition saves the running variance by reference and
    updates it in place; its moving-branch gradient uses the *updated* variance. Ours
    follows the forward exactly: dx = dy * gamma / sqrt(rv_pre + eps)."""
    dtype = torch.float64
    C = 5
    mask = torch.tensor([True, False, True, False, False])
    x = _rand_x((6, C, 3, 3), dtype, scale=3.0)
    w = 1 + 0.4 * torch.randn(C, dtype=dtype)
    b = 0.3 * torch.randn(C, dtype=dtype)
    rm, rv = 0.5 * torch.randn(C, dtype=dtype), 0.5 + torch.rand(C, dtype=dtype)
    rv_pre = rv.clone()
    dy = torch.randn_like(x)

    xa = x.clone().requires_grad_()
    ya = SF.stoch_norm(xa, rm.clone(), rv.clone(), w, b, training=True, momentum=0.5, mask=mask,
                       backend=BACKEND)
    ya.backward(dy)
    xt = x.clone().requires_grad_()
    rm_t, rv_t = rm.clone(), rv.clone()
    yt = _stoch_published(xt, w, b, rm_t, rv_t, mask, 0.5)
    yt.backward(dy)

    torch.testing.assert_close(ya, yt)  # same forward ...
    moving = ~mask
    analytic = dy * (w / torch.sqrt(rv_pre + 1e-5)).view(1, -1, 1, 1)
    torch.testing.assert_close(xa.grad[:, moving], analytic[:, moving])
    stale = dy * (w / torch.sqrt(rv_t + 1e-5)).view(1, -1, 1, 1)  # ... but the trap's gradient
    torch.testing.assert_close(xt.grad[:, moving], stale[:, moving])
    assert not torch.allclose(xt.grad[:, moving], xa.grad[:, moving], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(xa.grad[:, mask], xt.grad[:, mask])  # batch channels agree


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_stochnorm_p_extremes(p):
    """p=0: every channel uses the pre-update running statistics (which are still updated);
    p=1: BatchNorm training, exactly."""
    C = 6
    x = _rand_x((5, C, 3, 2), torch.float64)
    rm, rv = 0.5 * torch.randn(C, dtype=torch.float64), 0.5 + torch.rand(C, dtype=torch.float64)
    rm_b, rv_b = rm.clone(), rv.clone()
    y = SF.stoch_norm(x, rm, rv, training=True, p=p, backend=BACKEND)
    if p == 0.0:
        want = F.batch_norm(x, rm_b.clone(), rv_b.clone(), training=False)
        F.batch_norm(x, rm_b, rv_b, training=True)
    else:
        want = F.batch_norm(x, rm_b, rv_b, training=True)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(rm, rm_b)
    torch.testing.assert_close(rv, rv_b)


# ------------------------------------------------------------------- gradcheck
def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 3), (2, 4, 2, 3), (2, 4, 2, 1, 2)])
def test_gradcheck_stoch_norm(shape):
    C = shape[1]
    x = _rand_x(shape, torch.float64).requires_grad_()
    w = (1 + 0.4 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    rm, rv = 0.5 * torch.randn(C, dtype=torch.float64), 0.5 + torch.rand(C, dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])

    def fn(x, w, b):  # fresh running statistics each call: the step updates them
        return SF.stoch_norm(x, rm.clone(), rv.clone(), w, b, training=True, mask=mask, backend=BACKEND)
    _gc(fn, x, w, b)

    def fn_eval(x, w, b):
        return SF.stoch_norm(x, rm, rv, w, b, training=False, backend=BACKEND)
    _gc(fn_eval, x, w, b)


@pytest.mark.parametrize("shape,G", [((3, 4, 2, 2), 2), ((3, 4, 2, 2), 8), ((2, 4, 6), 12),
                                     ((4, 6), 3), ((2, 2, 2, 2, 2), 4)])
def test_gradcheck_batch_group_norm(shape, G):
    C = shape[1]
    x = _rand_x(shape, torch.float64).requires_grad_()
    w = (1 + 0.4 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    rm, rv = torch.randn(G, dtype=torch.float64), 0.5 + torch.rand(G, dtype=torch.float64)

    def fn(x, w, b):
        return SF.batch_group_norm(x, G, rm.clone(), rv.clone(), w, b, training=True, backend=BACKEND)
    _gc(fn, x, w, b)


def _window_case(C=4, cin=3, groups=1, K=2, dtype=torch.float64):
    conv_w = 0.3 * torch.randn(C, cin // groups, 3, 3, dtype=dtype)
    conv_in = torch.randn(2, cin, 3, 3, dtype=dtype)
    x = F.conv2d(conv_in, conv_w, padding=1, groups=groups) + 0.5
    win = CBNWindow.empty(K + 1, C, conv_w.shape, groups, dtype=dtype)
    with torch.no_grad():
        win.mean.copy_(x.mean((0, 2, 3)) + 0.1 * torch.randn(K, C, dtype=dtype))
        win.var.copy_(x.var((0, 2, 3)) * (1 + 0.2 * torch.rand(K, C, dtype=dtype)))
        win.dmu.copy_(0.05 * torch.randn(win.dmu.shape, dtype=dtype))
        win.dvar.copy_(0.05 * torch.randn(win.dvar.shape, dtype=dtype))
        win.dmu_w.copy_(0.1 * torch.randn(K, C, dtype=torch.float64))
        win.dvar_w.copy_(0.1 * torch.randn(K, C, dtype=torch.float64))
        win.valid.fill_(True)
        win.step.fill_(K)
    return conv_in, conv_w, x, win


@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_cross_iteration_batch_norm(groups):
    C = 4
    conv_in, conv_w, x, win = _window_case(C=C, cin=4, groups=groups)
    x = x.detach().requires_grad_()
    w = (1 + 0.4 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    b = (0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_()
    rm, rv = torch.randn(C, dtype=torch.float64), 0.5 + torch.rand(C, dtype=torch.float64)

    def fn(x, w, b):  # a fresh copy of the window each call: the step pushes an entry
        window = CBNWindow(*(t.clone() for t in win))
        return SF.cross_iteration_batch_norm(x, conv_in, conv_w, window, w, b, rm.clone(), rv.clone(),
                                             training=True, padding=1, groups=groups, backend=BACKEND)
    # the window really takes part (otherwise this would only be BatchNorm's gradcheck)
    y_win = fn(x, w, b)
    y_bn = F.batch_norm(x, None, None, w, b, training=True)
    assert not torch.allclose(y_win, y_bn, atol=1e-3)
    _gc(fn, x, w, b)


# ------------------------------------------------------------------- numerics: large offset
def _offset_err(y32, y64):
    return float((y32.detach().double() - y64.detach()).abs().max())


def test_large_offset_stochnorm_and_bgn_float32():
    """1e4 + randn in float32: the statistics are as accurate as float32 allows (the mean's
    own rounding, like torch's BatchNorm), not E[x^2]-E[x]^2 garbage."""
    x = (1e4 + torch.randn(8, 6, 4, 4, dtype=torch.float64)).float()
    x64 = x.double()  # the same (rounded) values
    bn_err = _offset_err(F.batch_norm(x, None, None, training=True),
                         F.batch_norm(x64, None, None, training=True))
    tol = max(3 * bn_err, 1e-3)
    mask = torch.tensor([True, False, True, True, False, False])
    rm, rv = torch.full((6,), 1e4) + torch.randn(6), 0.5 + torch.rand(6)
    y32 = SF.stoch_norm(x, rm.clone(), rv.clone(), training=True, mask=mask, backend=BACKEND)
    y64 = SF.stoch_norm(x64, rm.double(), rv.double(), training=True, mask=mask, backend=BACKEND)
    assert _offset_err(y32, y64) < tol
    for G in (3, 12, 1):
        rmg, rvg = torch.full((G,), 1e4), torch.ones(G)
        rm32, rv32, rm64, rv64 = rmg.clone(), rvg.clone(), rmg.double(), rvg.double()
        y32 = SF.batch_group_norm(x, G, rm32, rv32, training=True, backend=BACKEND)
        y64 = SF.batch_group_norm(x64, G, rm64, rv64, training=True, backend=BACKEND)
        assert _offset_err(y32, y64) < tol, G
        torch.testing.assert_close(rv32.double(), rv64, rtol=1e-3, atol=1e-3)


def test_large_offset_cbn_float32():
    """CBN at a 1e4 offset (from the conv bias) over several steps with a full window:
    float32 stays close to float64."""
    torch.manual_seed(3)
    conv64 = nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        conv64.bias.fill_(1e4)
    conv32 = copy.deepcopy(conv64).float()
    c64 = sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND).double().bind(conv64)
    c32 = sx.CrossIterationBatchNorm2d(4, window=3, backend=BACKEND).bind(conv32)
    for step in range(5):
        inp = torch.randn(4, 3, 5, 5)
        h32 = conv32(inp)  # float64 normalises the same (rounded) conv output
        y32 = c32(h32)
        y64 = c64(h32.double(), conv_input=inp.double())
        assert _offset_err(y32, y64) < 3e-3, step
        g = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.01
        with torch.no_grad():  # the same small weight change in both
            conv64.weight += g
            conv32.weight += g.float()
    assert bool(c32.window_valid.all())
    torch.testing.assert_close(c32.running_var.double(), c64.running_var, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------- half precision
def _half_err(y, want):
    y, want = y.detach().double(), want.detach()
    return float((y - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["stochnorm", "bgn", "bgn_pieces", "cbn"])
def test_half_precision_inputs_with_float32_state(kind, dtype):
    """float16/bfloat16 inputs, float32 parameters and buffers (the autocast case): the
    output has the input's dtype and is as close to the float64 result as torch's own
    BatchNorm gets in that dtype."""
    C = 6
    x = _rand_x((4, C, 4, 4), torch.float32, offset=3.0).to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    bn = _randomize(nn.BatchNorm2d(C))
    bn64 = copy.deepcopy(bn).double()
    xb = x.clone().requires_grad_()
    yb = bn(xb)
    yb.backward(dy)
    xb64 = x.double().requires_grad_()
    yb64 = bn64(xb64)
    yb64.backward(dy.double())
    bn_err = max(_half_err(yb, yb64), _half_err(xb.grad, xb64.grad))

    conv = nn.Conv2d(3, C, 3, padding=1)
    if kind == "stochnorm":
        layer = sx.StochNorm2d(C, p=0.5, backend=BACKEND)
    elif kind == "bgn":
        layer = sx.BatchGroupNorm2d(C, 3, backend=BACKEND)
    elif kind == "bgn_pieces":
        layer = sx.BatchGroupNorm2d(C, 2 * C, backend=BACKEND)
    else:
        layer = sx.CrossIterationBatchNorm2d(C, window=3, backend=BACKEND).bind(conv)
        with torch.no_grad():
            layer.window_mean.copy_(x.float().mean((0, 2, 3)) + 0.1 * torch.randn(2, C))
            layer.window_var.copy_(x.float().var((0, 2, 3)) * (1 + 0.2 * torch.rand(2, C)))
            layer.window_valid.fill_(True)
    with torch.no_grad():
        layer.weight.copy_(bn.weight)
        layer.bias.copy_(bn.bias)
        if layer.running_mean.numel() == C:
            layer.running_mean.copy_(bn.running_mean)
            layer.running_var.copy_(bn.running_var)
    layer64 = copy.deepcopy(layer).double()
    if kind == "cbn":
        conv64 = copy.deepcopy(conv).double()
        layer64.bind(conv64)
        layer64.load_state_dict(layer.state_dict())
        layer64.double()
        # x is not the conv's output, so its input goes in explicitly (window Jacobians)
        conv_in = torch.randn(4, 3, 4, 4)
    extra = dict(conv_input=conv_in) if kind == "cbn" else {}
    extra64 = dict(conv_input=conv_in.double()) if kind == "cbn" else {}

    torch.manual_seed(5)
    xa = x.clone().requires_grad_()
    ya = layer(xa, **extra)
    ya.backward(dy)
    torch.manual_seed(5)  # the same StochNorm mask
    xa64 = x.double().requires_grad_()
    ya64 = layer64(xa64, **extra64)
    ya64.backward(dy.double())
    assert ya.dtype == dtype and xa.grad.dtype == dtype
    assert layer.running_mean.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    floor = {torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]  # a few output roundings
    tol = max(2.5 * bn_err, floor)
    assert _half_err(ya, ya64) <= tol
    assert _half_err(xa.grad, xa64.grad) <= tol
    assert _half_err(layer.weight.grad, layer64.weight.grad) <= tol
    torch.testing.assert_close(layer.running_var.double(), layer64.running_var, rtol=tol, atol=tol)


# ------------------------------------------------------------------- memory formats
@pytest.mark.parametrize("kind,layout", [
    (k, lay) for k in ("stochnorm", "bgn", "bgn_pieces", "cbn")
    for lay in ("channels_last", "channels_last_3d", "strided", "transposed")
    if not (k == "cbn" and lay == "channels_last_3d")])
def test_memory_formats_and_non_contiguous_inputs(kind, layout):
    """Outputs and gradients do not depend on the layout; channels_last(_3d) inputs give
    outputs in the same format."""
    d = 3 if layout == "channels_last_3d" else 2
    base = _rand_x((3, 6, 4, 6, 4) if d == 3 else (3, 6, 8, 6), torch.float64)
    if layout == "channels_last":
        x, fmt = base.contiguous(memory_format=torch.channels_last), torch.channels_last
    elif layout == "channels_last_3d":
        x, fmt = base.contiguous(memory_format=torch.channels_last_3d), torch.channels_last_3d
    elif layout == "strided":
        x, fmt = base[:, :, ::2], None
    else:
        x, fmt = base.transpose(2, 3).contiguous().transpose(2, 3), None
    assert not x.is_contiguous()
    make = {"stochnorm": lambda: STOCH[d](6, p=0.5, backend=BACKEND),
            "bgn": lambda: BGN[d](6, 2, backend=BACKEND),
            "bgn_pieces": lambda: BGN[d](6, 12, backend=BACKEND),
            "cbn": lambda: sx.CrossIterationBatchNorm2d(6, window=1, backend=BACKEND)}[kind]
    a, b = make().double(), make().double()
    _randomize(a)
    b.load_state_dict(a.state_dict())
    xa, xb = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    torch.manual_seed(11)
    ya = a(xa)
    torch.manual_seed(11)
    yb = b(xb)
    if fmt is not None:
        assert ya.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
