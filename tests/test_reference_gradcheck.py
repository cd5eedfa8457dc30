"""gradcheck of the reference StochNorm, BGN (groups and pieces) and CBN (with a
full window of past statistics of a conv output).

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import pytest
import torch
import torch.nn.functional as F

from stochnorm_ext import functional as SF
from stochnorm_ext.cbn_window import CBNWindow

from reference_helpers import BACKEND, rand_x


# ------------------------------------------------------------------- gradcheck
def _gc(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 3), (2, 4, 2, 3), (2, 4, 2, 1, 2)])
def test_gradcheck_stoch_norm(shape):
    C = shape[1]
    x = rand_x(shape, torch.float64).requires_grad_()
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
    x = rand_x(shape, torch.float64).requires_grad_()
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
