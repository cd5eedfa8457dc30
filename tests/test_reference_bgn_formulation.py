"""The reference BGN against an independent formulation written here (reshape the
batch into its groups or pieces and normalise each): every grouping, layout and float dtype; the
order of the pieces; eval without running statistics.

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import pytest
import torch
import torch.nn.functional as F

import stochnorm_ext as sx

from reference_helpers import BACKEND, BGN, TOL, bshape, dims, rand_x


# ------------------------------------------------------------------- BGN: independent formulation
def _bgn_independent(x, G, w, b, rm, rv, training, momentum, eps=1e-5):
    """The paper's description, with torch's batch_norm doing the group statistics:
    (N, C, *S) -> (N, G, C*S/G), BatchNorm over G "channels", back, per-channel affine."""
    N = x.shape[0]
    z = F.batch_norm(x.reshape(N, G, -1), rm, rv, None, None, training, momentum, eps)
    return z.reshape(x.shape) * w.view(bshape(x)) + b.view(bshape(x))


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
    C, d = shape[1], dims(shape)
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
        x = rand_x(shape, dtype).contiguous(memory_format=_MF[fmt])
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
    x = rand_x((4, 6, 3, 3), torch.float64)
    layer = sx.BatchGroupNorm2d(6, 3, track_running_stats=False, backend=BACKEND).double().eval()
    assert layer.running_mean is None
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(layer(x), _bgn_independent(x, 3, w, b, None, None, True, 0.0))
