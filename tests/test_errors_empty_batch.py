"""N == 0 inputs (docs/SPEC.md, shared rules): every layer in training and eval gives an
empty output, counts the call like BatchNorm and keeps its buffers.
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext import functional as SF

from errors_helpers import BACKEND, LAYER_NAMES, assert_untouched, layers, randomized, snapshot


# ------------------------------------------------------------------- N == 0
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", LAYER_NAMES + ["StochNorm1d", "BatchGroupNorm3d"])
def test_empty_batch(name, training):
    if name == "StochNorm1d":
        layer, shape = randomized(sx.StochNorm1d(6, backend=BACKEND)), (0, 6)
    elif name == "BatchGroupNorm3d":
        layer, shape = randomized(sx.BatchGroupNorm3d(6, 12, backend=BACKEND)), (0, 6, 2, 1, 2)
    else:
        layer, shape = layers()[name], (0, 6, 4, 4)
    layer.train(training)
    conv = layer.bound_conv if isinstance(layer, sx.CrossIterationBatchNorm2d) else None
    before = snapshot(layer)
    # (CBN: running the bound conv hands its input to the layer, which must get the conv's output)
    leaf = torch.randn((0, 3, 4, 4) if conv is not None else shape, requires_grad=True)
    x = conv(leaf) if conv is not None else leaf
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert leaf.grad.shape == leaf.shape
    if training:  # counted as a step, as nn.BatchNorm*d counts it; nothing else changes
        before["num_batches_tracked"] += 1
    assert_untouched(layer, before)


@pytest.mark.parametrize("kind", ["stochnorm", "bgn", "cbn"])
def test_empty_batch_counts_like_batchnorm(kind):
    # momentum=None averages over num_batches_tracked, which nn.BatchNorm2d advances for an
    # empty batch too: batch, empty batch, batch must give BatchNorm's running statistics.
    bn = nn.BatchNorm2d(6, momentum=None)
    ours = {"stochnorm": lambda: sx.StochNorm2d(6, momentum=None, p=1.0, backend=BACKEND),
            "bgn": lambda: sx.BatchGroupNorm2d(6, 6, momentum=None, backend=BACKEND),
            "cbn": lambda: sx.CrossIterationBatchNorm2d(6, window=1, momentum=None, backend=BACKEND)}[kind]()
    for n in (3, 0, 5):
        x = torch.randn(n, 6, 4, 4)
        bn(x)
        ours(x)
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, bn.running_mean)
    torch.testing.assert_close(ours.running_var, bn.running_var)


def test_empty_batch_functional_keeps_buffers():
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 4, 3)
    assert SF.stoch_norm(x, rm, rv, training=True).shape == (0, 4, 3)
    assert SF.batch_group_norm(x, 2, rm[:2], rv[:2], training=True).shape == (0, 4, 3)
    assert SF.cross_iteration_batch_norm(torch.randn(0, 4, 2, 2), running_mean=rm, running_var=rv,
                                         training=True).shape == (0, 4, 2, 2)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
