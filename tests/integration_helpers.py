"""Helpers of the tests of the layers with the rest of PyTorch (tests/test_integration_*.py): the
backends that run on CPU tensors here, each layer after a conv, SGD steps that record outputs,
gradients and state, and converted ResNet-18s. Without torchvision every test that imports
this module is skipped.
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as sx

from conftest import available


torchvision = pytest.importorskip("torchvision")

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b, "cpu")]
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- helpers
def randomize(module):
    """Non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for name, t in module.named_parameters():
            if name.endswith("weight") and t.dim() == 1:
                t.uniform_(0.5, 1.5)
            elif name.endswith("bias") and t.dim() == 1:
                t.normal_(0, 0.3)
        for name, t in module.named_buffers():
            if name.endswith("running_mean"):
                t.normal_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)


def make_layer(name, C, backend, conv):
    """The layer ``name`` for the C output channels of ``conv`` (2d or 3d)."""
    if name == "stochnorm":
        return (sx.StochNorm2d if conv.weight.dim() == 4 else sx.StochNorm3d)(C, p=0.5, backend=backend)
    if name == "bgn_groups":
        return (sx.BatchGroupNorm2d if conv.weight.dim() == 4 else sx.BatchGroupNorm3d)(C, 2, backend=backend)
    if name == "bgn_pieces":
        return (sx.BatchGroupNorm2d if conv.weight.dim() == 4 else sx.BatchGroupNorm3d)(C, 2 * C, backend=backend)
    return sx.CrossIterationBatchNorm2d(C, window=2, burnin=0, backend=backend).bind(conv)


LAYER_NAMES = ["stochnorm", "bgn_groups", "bgn_pieces", "cbn"]


def conv_norm_relu(name, backend, dims=2):
    torch.manual_seed(0)
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(3, 4, 3, padding=1, bias=False)  # as in ResNets
    norm = make_layer(name, 4, backend, conv)
    randomize(norm)
    return nn.Sequential(conv, norm, nn.ReLU())


def run_steps(model, inputs, autocast=None, seed=0):
    """Training steps (SGD); returns per step (output, input grad, param grads) and the state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    record = []
    for step, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        torch.manual_seed(seed + step)  # the same StochNorm masks in every run
        if autocast is None:
            y = model(x)
        else:
            with torch.autocast(**autocast):
                y = model(x)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)).sum().backward()
        record.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    return record, {k: v.clone() for k, v in model.state_dict().items()}

def assert_relative_error(actual, expected, tol, what=""):
    """||actual - expected|| <= tol * ||expected|| (a whole-tensor criterion)."""
    error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"


# --------------------------------------------------------------------------- converted ResNet-18s
# BGN with both groupings: 2 pieces per channel for the 64/128-channel layers (spatial
# sizes 16x16 and 8x8 here), groups of 32 channels for the 256/512-channel ones.
MIXED_GROUPS = lambda C: 2 * C if C <= 128 else C // 32  # noqa: E731
# 4 x 64 x 64: layer4 still sees 16 values per channel; with fewer (2 x 32 x 32 gives 2)
# BatchNorm's own gradients are so ill-conditioned that eager and compiled runs of a plain
# BatchNorm ResNet-18 part ways after one step.
IMAGE = (4, 3, 64, 64)
RESNET_KINDS = {
    "stochnorm": ("stochnorm", dict(p=0.5)),
    "bgn": ("bgn", dict(num_groups=MIXED_GROUPS)),  # both groupings in one model
    "cbn": ("cbn", dict(window=3, burnin=1)),
}


def converted_resnet(key, backend=None):
    """A converted ResNet-18 whose BatchNorms had running statistics of real activations
    (like a pretrained model): StochNorm's moving branch and eval then normalise."""
    kind, options = RESNET_KINDS[key]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0  # running statistics := this batch's
        model(torch.randn(8, *IMAGE[1:]))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return sx.convert_model(model, kind, backend=backend, **options)
