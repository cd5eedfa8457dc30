"""Helpers of the deployment tests (tests/test_deploy_*.py): inputs with a different mean and
spread per channel, a few training steps so that the state is non-trivial, the comparison,
and the converted resnet18 models (trained once per kind and shared).
"""
import pytest
import torch
from torch import nn

import stochnorm_ext as se
from stochnorm_ext import PiecewiseAffine


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
MIXED_GROUPS = lambda C: 2 * C if C <= 128 else C // 4  # noqa: E731  pieces early, groups later


# --------------------------------------------------------------------------- helpers
def our_layers(model):
    """Modules of stochnorm_ext's layer classes (PiecewiseAffine is plain PyTorch)."""
    return [type(m).__name__ for m in model.modules()
            if type(m).__module__.startswith("stochnorm_ext") and not isinstance(m, PiecewiseAffine)]


def our_hooks(model):
    return [h for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
            for h in d.values() if type(h).__module__.startswith("stochnorm_ext")]


def make_input(shape, device="cpu", dtype=torch.float32):
    """Data with a different mean and spread per channel."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    offset = torch.linspace(-2, 3, C).view(view)
    spread = torch.linspace(0.5, 2, C).view(view)
    return (torch.randn(shape) * spread + offset).to(device, dtype)


def train(model, inputs, steps=3, lr=1e-2):
    """A few SGD steps, so running statistics and affine parameters are non-trivial."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if params else None
    for _ in range(steps):
        out = model(inputs())
        if opt is not None:
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    model.eval()
    return model


def randomise_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "affine", False):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


def close(actual, expected, tol=1e-5):
    """Equal within float32 rounding, relative to the output's magnitude."""
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)

# --------------------------------------------------------------------------- resnet18
RESNET_KINDS = {
    "stochnorm": ("stochnorm", {}),
    "bgn32": ("bgn", {"num_groups": 32}),
    "bgn-mixed": ("bgn", {"num_groups": MIXED_GROUPS}),
    "cbn": ("cbn", {"window": 2}),
}
_RESNETS = {}


def trained_resnet(key):
    """resnet18(weights=None) converted and trained two steps (built once per kind)."""
    if key not in _RESNETS:
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(1)
        kind, options = RESNET_KINDS[key]
        model = se.convert_model(torchvision.models.resnet18(weights=None, num_classes=10), kind, **options)
        # 64 x 64: at 32 x 32 the last stage's maps are 1 x 1, two values per statistic with a
        # batch of 2, and an untrained resnet's step at lr 1e-2 overflows for most StochNorm masks.
        x = torch.randn(2, 3, 64, 64)

        def step_loss():
            return nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(2):
            opt.zero_grad()
            step_loss().backward()
            opt.step()
        _RESNETS[key] = model.eval()
    return _RESNETS[key]
