"""The reference layers on float16 and bfloat16 inputs with float32 parameters and
running statistics, against float64.

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import copy

import pytest
import torch
from torch import nn

import stochnorm_ext as sx

from reference_helpers import BACKEND, rand_x, randomize


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
    x = rand_x((4, C, 4, 4), torch.float32, offset=3.0).to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    bn = randomize(nn.BatchNorm2d(C))
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
