"""The reference StochNorm per channel against BatchNorm in training and eval
(an independent formulation written here), the published two-call composition whose gradient
differs (the trap the reference avoids), and the masks of p = 0 and p = 1.

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import pytest
import torch
import torch.nn.functional as F

from stochnorm_ext import functional as SF

from reference_helpers import BACKEND, SHAPES, TOL, bshape, rand_x


# ------------------------------------------------------------------- StochNorm: per channel
def _stoch_independent(x, w, b, rm, rv, mask, momentum, eps=1e-5):
    """Per channel: mask True -> BN training output; False -> BN with the running
    statistics snapshot taken BEFORE the update (the contract). Updates rm/rv like BN."""
    rm0, rv0 = rm.clone(), rv.clone()
    y_batch = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    y_moving = F.batch_norm(x, rm0, rv0, w, b, False, 0.0, eps)
    return torch.where(mask.view(bshape(x)), y_batch, y_moving)


def _stoch_published(x, w, b, rm, rv, mask, momentum, eps=1e-5):
    """The published composition: moving branch on the live buffers, then the batch branch
    updates them in place (no snapshot)."""
    y_moving = F.batch_norm(x, rm, rv, w, b, False, 0.0, eps)
    y_batch = F.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    return torch.where(mask.view(bshape(x)), y_batch, y_moving)


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
    x = rand_x(shape, dtype).contiguous(memory_format=fmt)
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
    analytic = dy * (w.detach() / torch.sqrt(rv_pre + 1e-5)).view(bshape(x))
    torch.testing.assert_close(xa.grad[:, moving], analytic[:, moving], **TOL[dtype])


def test_stochnorm_published_trap_gradient_differs():
    """The published two-call composition saves the running variance by reference and
    updates it in place; its moving-branch gradient uses the *updated* variance. Ours
    follows the forward exactly: dx = dy * gamma / sqrt(rv_pre + eps)."""
    dtype = torch.float64
    C = 5
    mask = torch.tensor([True, False, True, False, False])
    x = rand_x((6, C, 3, 3), dtype, scale=3.0)
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
    x = rand_x((5, C, 3, 2), torch.float64)
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
