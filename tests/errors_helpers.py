"""Helpers of the bad-input tests (tests/test_errors_*.py): layers with non-trivial state (a bound
CBN with a non-empty window), and the check that a call raised and left that state untouched.
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx


BACKEND = "reference"


def randomized(layer):
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.normal_()
            layer.bias.normal_()
        if layer.running_mean is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(4)
    return layer


def bound_cbn(window=3, burnin=0):
    conv = nn.Conv2d(3, 6, 3, padding=1)
    cbn = randomized(sx.CrossIterationBatchNorm2d(6, window=window, burnin=burnin,
                                                   backend=BACKEND)).bind(conv)
    for _ in range(2):  # a non-empty window and step counter to protect
        cbn(conv(torch.randn(2, 3, 4, 4)))
    assert int(cbn.window_valid.sum()) == 2
    return conv, cbn


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_untouched(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


def raises_untouched(module, exc, match, call):
    before = snapshot(module)
    with pytest.raises(exc, match=match) as info:
        call()
    assert_untouched(module, before)
    return info


def layers():
    """One of each layer in training, with non-trivial state."""
    return {
        "StochNorm2d": randomized(sx.StochNorm2d(6, backend=BACKEND)),
        "BatchGroupNorm2d": randomized(sx.BatchGroupNorm2d(6, 3, backend=BACKEND)),
        "BatchGroupNorm2d_pieces": randomized(sx.BatchGroupNorm2d(6, 12, backend=BACKEND)),
        "CrossIterationBatchNorm2d": bound_cbn()[1],
        "CrossIterationBatchNorm2d_w1": randomized(sx.CrossIterationBatchNorm2d(6, window=1, backend=BACKEND)),
    }


LAYER_NAMES = list(layers())
