"""Deploying without the extension: ``to_batchnorm`` on each layer (every dims, grouping,
memory format and device), on bound CBN and Conv2dCBN, and on a layer shared by two parents.
"""
import copy

import pytest
import torch
from torch import nn

import stochnorm_ext as se
from stochnorm_ext import (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d, Conv2dCBN,
                           PiecewiseAffine, StochNorm1d, StochNorm2d, StochNorm3d, fold_into_conv,
                           to_batchnorm)

from deploy_helpers import CL, DEVICES, close, make_input, our_hooks, our_layers, randomise_affine, train


# --------------------------------------------------------------------------- per layer
LAYERS = {  # name: (constructor, input shape, expected replacement)
    "stoch1d": (lambda: StochNorm1d(6), (5, 6), nn.BatchNorm1d),
    "stoch1d-L": (lambda: StochNorm1d(6, momentum=None), (3, 6, 5), nn.BatchNorm1d),
    "stoch2d": (lambda: StochNorm2d(6, eps=1e-3), (2, 6, 4, 4), nn.BatchNorm2d),
    "stoch3d": (lambda: StochNorm3d(6, affine=False), (2, 6, 2, 3, 4), nn.BatchNorm3d),
    "bgn1d-groups": (lambda: BatchGroupNorm1d(6, 3), (3, 6, 8), nn.BatchNorm1d),
    "bgn1d-pieces": (lambda: BatchGroupNorm1d(6, 12), (3, 6, 8), PiecewiseAffine),
    "bgn2d-groups": (lambda: BatchGroupNorm2d(6, 2, eps=1e-3), (2, 6, 4, 4), nn.BatchNorm2d),
    "bgn2d-one": (lambda: BatchGroupNorm2d(6, 1), (2, 6, 4, 4), nn.BatchNorm2d),
    "bgn2d-pieces": (lambda: BatchGroupNorm2d(6, 18), (2, 6, 6, 4), PiecewiseAffine),
    "bgn2d-pieces-noaffine": (lambda: BatchGroupNorm2d(6, 12, affine=False), (2, 6, 4, 4), PiecewiseAffine),
    "bgn3d-groups": (lambda: BatchGroupNorm3d(6, 3, momentum=None), (2, 6, 2, 3, 4), nn.BatchNorm3d),
    "bgn3d-pieces": (lambda: BatchGroupNorm3d(6, 12), (2, 6, 2, 3, 4), PiecewiseAffine),
}
FORMATS = ["contiguous", "channels_last"]


def trained_layer(name, device="cpu", dtype=torch.float32):
    make, shape, _ = LAYERS[name]
    model = nn.Sequential(make()).to(device, dtype)
    randomise_affine(model)
    return train(model, lambda: make_input(shape, device, dtype)), shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,fmt", [(name, fmt) for name, (_, shape, _) in LAYERS.items()
                                      for fmt in FORMATS if fmt == "contiguous" or len(shape) in CL])
def test_to_batchnorm_layer(name, fmt, device):
    model, shape = trained_layer(name, device)
    old = model[0]
    x = make_input(shape, device)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=CL[len(shape)])
    expected = model(x)
    deployed = to_batchnorm(model)
    new = deployed[0]
    assert type(new) is LAYERS[name][2]
    assert our_layers(deployed) == [] and our_hooks(deployed) == []
    assert type(model[0]) is type(old)  # the original is untouched (not inplace)
    out = deployed(x)
    close(out, expected)
    if fmt == "channels_last":
        assert out.is_contiguous(memory_format=CL[len(shape)])
    # Copies on the same device and dtype; hyper-parameters carried over.
    old_ptrs = {t.data_ptr() for t in list(old.parameters()) + list(old.buffers())}
    for t in list(new.parameters()) + list(new.buffers()):
        assert t.data_ptr() not in old_ptrs
        assert t.device == old.running_mean.device
        assert t.dtype == old.running_mean.dtype or t.dtype == torch.long
    if isinstance(new, nn.modules.batchnorm._BatchNorm):
        assert (new.eps, new.momentum, new.affine) == (old.eps, old.momentum, old.affine)
        assert new.track_running_stats and int(new.num_batches_tracked) == int(old.num_batches_tracked)


def test_bgn_groups_expand_running_stats():
    model, _ = trained_layer("bgn2d-groups")
    bn = to_batchnorm(model)[0]
    torch.testing.assert_close(bn.running_mean, model[0].running_mean.repeat_interleave(3))
    torch.testing.assert_close(bn.running_var, model[0].running_var.repeat_interleave(3))


def test_keeps_training_flag_and_dtype():
    model, shape = trained_layer("stoch2d", dtype=torch.float64)
    model.add_module("pieces", BatchGroupNorm2d(6, 12).double().eval())
    model[0].train()
    deployed = to_batchnorm(model)
    assert deployed[0].training and not deployed.training and not deployed.pieces.training
    assert all(t.dtype == torch.float64 for t in deployed.parameters())
    assert deployed[0].running_mean.dtype == torch.float64
    assert deployed.pieces.scale.dtype == torch.float64


def test_root_layer_and_inplace():
    layer, shape = trained_layer("bgn2d-pieces")
    layer = layer[0]
    x = make_input(shape)
    expected = layer(x)
    new = to_batchnorm(layer)
    assert isinstance(new, PiecewiseAffine)
    close(new(x), expected)
    model = nn.Sequential(copy.deepcopy(layer), nn.ReLU())
    assert to_batchnorm(model, inplace=True) is model and isinstance(model[0], PiecewiseAffine)


def test_bgn_without_running_stats_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(BatchGroupNorm2d(4, 2, track_running_stats=False)))
    with pytest.raises(ValueError, match=r"'1\.0' \(BatchGroupNorm2d\).*track_running_stats=False"):
        to_batchnorm(model, inplace=True)
    assert isinstance(model[1][0], BatchGroupNorm2d)  # nothing changed
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_into_conv(model.eval())


def test_piecewise_affine_limits():
    layer, _ = trained_layer("bgn2d-pieces")
    new = to_batchnorm(layer)[0]
    with pytest.raises(ValueError, match="not a multiple of the 3 pieces"):
        new(torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"expected input \(N, 6, \.\.\.\)"):
        new(torch.randn(2, 5, 6, 4))
    x = make_input((2, 6, 6, 4))
    close(new(x.half()).float(), new(x), tol=1e-2)
    assert new(x.half()).dtype == torch.float16
    with pytest.raises(RuntimeError, match="cannot train"):
        new.train()(x)


# --------------------------------------------------------------------------- CBN
def test_cbn_bound_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4))
    se.convert_model(model, "cbn", window=3)
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 8, 8)), steps=4)
    assert our_hooks(model)  # convert_model bound the convs
    x = make_input((2, 3, 8, 8))
    expected = model(x)
    deployed = to_batchnorm(model)
    assert our_layers(deployed) == [] and our_hooks(deployed) == []
    assert isinstance(deployed[1], nn.BatchNorm2d) and isinstance(deployed[4], nn.BatchNorm2d)
    close(deployed(x), expected)
    xc = x.contiguous(memory_format=torch.channels_last)
    close(deployed(xc), model(xc))
    assert our_hooks(model)  # the original keeps its binding
    model.train()(x)  # and still trains


def test_conv2d_cbn_module():
    model = nn.Sequential(Conv2dCBN(3, 6, 3, padding=1, window=2), nn.ReLU())
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 6, 6)), steps=3)
    x = make_input((2, 3, 6, 6))
    deployed = to_batchnorm(model)
    assert our_layers(deployed) == []
    assert isinstance(deployed[0].conv, nn.Conv2d) and isinstance(deployed[0].norm, nn.BatchNorm2d)
    keys = {k for k in model.state_dict() if not k.startswith("0.norm.window_") and k != "0.norm.step"}
    assert keys == set(deployed.state_dict())
    close(deployed(x), model(x))
    folded = fold_into_conv(model)
    assert isinstance(folded[0].norm, nn.Identity)
    close(folded(x), model(x))


def test_cbn_without_running_stats_uses_batch_stats():
    model = nn.Sequential(Conv2dCBN(3, 4, 1, window=1, track_running_stats=False)).eval()
    x = make_input((2, 3, 5, 5))
    deployed = to_batchnorm(model)
    assert deployed[0].norm.running_mean is None
    close(deployed(x), model(x))
    assert fold_into_conv(model)[0].norm.__class__ is nn.BatchNorm2d  # nothing to fold


def test_to_batchnorm_keeps_a_shared_layer_shared():
    norm = StochNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm, nn.ReLU(), nn.Conv2d(4, 4, 1), norm)
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 4, 4)))
    x = make_input((2, 3, 4, 4))
    deployed = to_batchnorm(model)
    assert type(deployed[1]) is nn.BatchNorm2d and deployed[4] is deployed[1]
    close(deployed(x), model(x))
