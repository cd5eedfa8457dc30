"""Deploying without the extension: ``to_batchnorm`` and ``fold_into_conv`` on converted
resnet18 models of every kind: no stochnorm_ext layer or hook left, the same outputs (both
memory formats), the input model untouched.
"""
import pytest
import torch
from torch import nn

from stochnorm_ext import PiecewiseAffine, fold_into_conv, to_batchnorm

from deploy_helpers import RESNET_KINDS, close, our_hooks, our_layers, trained_resnet


@pytest.mark.parametrize("key", list(RESNET_KINDS))
def test_resnet18(key):
    model = trained_resnet(key)
    x = torch.randn(2, 3, 32, 32)
    xc = x.contiguous(memory_format=torch.channels_last)
    expected = model(x)
    deployed = to_batchnorm(model)
    assert our_layers(deployed) == [] and our_hooks(deployed) == []
    close(deployed(x), expected)
    close(deployed(xc), model(xc))
    folded = fold_into_conv(model)
    assert type(folded) is type(model)
    assert not any(m.training for m in list(deployed.modules()) + list(folded.modules()))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    n_pieces = sum(isinstance(m, PiecewiseAffine) for m in folded.modules())
    assert n_pieces == (10 if key == "bgn-mixed" else 0)  # 64- and 128-channel BGNs have G = 2C
    close(folded(x), expected, tol=1e-4)
    close(folded(xc), expected, tol=1e-4)
    assert our_layers(model)  # the input model is untouched
