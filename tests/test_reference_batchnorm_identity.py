"""The reference implementations against torch's own BatchNorm where they are
BatchNorm: StochNorm with p = 1, BGN with one group per channel, CBN with a window of one (and
bound before its burn-in ends), in training (outputs, gradients, running statistics over
several steps) and in eval (BatchNorm's eval, no buffer changed).

Everything runs the ``reference`` backend explicitly: other test files compare the kernel
backends with it, so it has to be right on its own.
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx

from reference_helpers import BACKEND, BGN, BN, SHAPES, STOCH, TOL, dims, make_identity, rand_x, randomize, sgd_


IDENTITY_CASES = [(k, s) for k in ("stochnorm", "bgn") for s in SHAPES] + [("cbn", SHAPES[2])]
# ------------------------------------------------------------------- identities vs nn.BatchNorm
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,shape", IDENTITY_CASES)
def test_identity_with_batchnorm_training(kind, shape, dtype, momentum):
    """StochNorm p=1, BGN G=C and CBN window 1 are BatchNorm: outputs, every gradient and
    the running statistics over several SGD steps (momentum None: cumulative average)."""
    d, C = dims(shape), shape[1]
    bn = randomize(BN[d](C, momentum=momentum)).to(dtype)
    layer = make_identity(kind, d, C, momentum).to(dtype)
    layer.load_state_dict(bn.state_dict())  # BatchNorm's state dict loads as it is
    for step in range(3):
        x = rand_x(shape, dtype)
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
        sgd_(layer)
        sgd_(bn)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, **TOL[dtype])
        torch.testing.assert_close(layer.running_var, bn.running_var, **TOL[dtype])
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 4 + step
    # eval afterwards: BN eval with the (trained) buffers, nothing changes
    layer.eval()
    bn.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = rand_x(shape, dtype).requires_grad_()
    torch.testing.assert_close(layer(x), bn(x), **TOL[dtype])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cbn_window_bound_identity_before_burnin():
    """A bound CBN with window > 1 is still BatchNorm during its burn-in (nothing stored)."""
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    cbn = sx.CrossIterationBatchNorm2d(4, window=3, burnin=5, backend=BACKEND).double().bind(conv)
    bn = randomize(nn.BatchNorm2d(4)).double()
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
    d, C = dims(shape), shape[1]
    for layer in _eval_layers(C, d):
        layer.momentum = momentum
        bn = randomize(BN[d](C, momentum=momentum)).double().eval()
        layer.double()
        layer.load_state_dict(bn.state_dict(), strict=False)
        if isinstance(layer, sx.CrossIterationBatchNorm2d) and layer.bound_conv is not None:
            with torch.no_grad():
                layer.window_valid.fill_(True)
        layer.eval()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        for _ in range(2):
            x = rand_x(shape, torch.float64)
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
