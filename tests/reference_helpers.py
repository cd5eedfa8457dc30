"""Helpers of the tests of the reference implementations (tests/test_reference_*.py): the
backend, tolerances, layer classes and shapes they share, random inputs and layers.
"""
import torch
from torch import nn

import stochnorm_ext as sx

from conftest import randomize_bn_


BACKEND = "reference"
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=3e-5, atol=3e-5)}

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
STOCH = {1: sx.StochNorm1d, 2: sx.StochNorm2d, 3: sx.StochNorm3d}
BGN = {1: sx.BatchGroupNorm1d, 2: sx.BatchGroupNorm2d, 3: sx.BatchGroupNorm3d}
SHAPES = [(7, 5), (4, 5, 7), (3, 5, 4, 3), (2, 5, 3, 2, 3)]


def dims(shape):
    return max(len(shape) - 2, 1)


def bshape(x):
    return (1, -1) + (1,) * (x.dim() - 2)


def rand_x(shape, dtype, offset=0.7, scale=2.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)


def randomize(m):
    return randomize_bn_(m, num_batches_tracked=3)


def make_identity(kind, d, C, momentum):
    if kind == "stochnorm":
        return STOCH[d](C, p=1.0, momentum=momentum, backend=BACKEND)
    if kind == "bgn":
        return BGN[d](C, C, momentum=momentum, backend=BACKEND)
    return sx.CrossIterationBatchNorm2d(C, window=1, momentum=momentum, backend=BACKEND)


def sgd_(module, lr=0.2):
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
            p.grad = None
