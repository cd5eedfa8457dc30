"""Whole networks for the small-batch section: a plain conv stack with ResNet-18's widths and
strides, torchvision's resnet18, each built with ``nn.BatchNorm2d`` and converted to one of
our layers with ``stochnorm_ext.convert_model``, and one SGD training step.

``conv_stack`` is public (``stochnorm_ext.bench.conv_stack``): tests and other code build
the same network to assert op counts and step ratios on it.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF
from torch import nn

from stochnorm_ext.bench.cases import CBN_WINDOW, STOCH_P
from stochnorm_ext.model_tools import convert_model

__all__ = ["RESNET18_WIDTHS", "NETWORK_INPUT", "conv_stack", "resnet18_strides", "with_layer",
           "small_bgn_groups", "SMALL_BGN_GROUPS", "training_step"]

# ResNet-18's stage widths, two 3x3 convs per stage (its basic blocks without the skips).
RESNET18_WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512)
NETWORK_INPUT = (8, 3, 64, 64)   # N, C, H, W of the whole-network step
NUM_CLASSES = 10
# BGN groupings of the small-batch section: groups of 4 channels, and one group for the
# whole layer (the G << C case whose coefficients a CUDA kernel once ran serially).
SMALL_BGN_GROUPS = ("C/4", "1")


def small_bgn_groups(spec: str, C: int) -> int:
    """Groups for C channels: ``C/k`` (groups of k channels, at least 1) or a plain count."""
    text = spec.replace(" ", "").upper()
    try:
        return max(C // int(text[2:]), 1) if text.startswith("C/") else int(text)
    except ValueError:
        raise ValueError(f"a small-batch BGN grouping is C/k or a group count (e.g. C/4, 1); got {spec!r}") from None


def resnet18_strides(widths: Sequence[int]) -> Tuple[int, ...]:
    """Stride 2 at the first conv of each width change, as ResNet-18's stages 2-4 (the first
    stage keeps the input's resolution: the first conv is stride 1)."""
    return tuple(2 if i > 0 and w != widths[i - 1] else 1 for i, w in enumerate(widths))


def conv_stack(widths: Sequence[int] = RESNET18_WIDTHS, in_channels: int = 3, num_classes: int = NUM_CLASSES,
               norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
               strides: Optional[Sequence[int]] = None) -> nn.Sequential:
    """A plain conv stack: per width, a 3x3 conv (padding 1, no bias: the norm has one) +
    ``norm(width)`` + ReLU; then global average pooling and a linear classifier.

    Default: ResNet-18's widths (eight blocks: 64, 64, 128, 128, 256, 256, 512, 512) with
    stride 2 at the first conv of each width change (``resnet18_strides``), no skips. Every
    norm directly follows its conv, so ``convert_model(model, "cbn")`` binds every pair.
    ``norm`` builds the norm from the channel count (default ``nn.BatchNorm2d``; convert
    afterwards with ``with_layer`` or ``stochnorm_ext.convert_model``)."""
    widths = tuple(widths)
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"conv_stack: widths must be positive channel counts, got {widths}")
    strides = resnet18_strides(widths) if strides is None else tuple(strides)
    if len(strides) != len(widths):
        raise ValueError(f"conv_stack: one stride per width expected, got {len(strides)} strides for "
                         f"{len(widths)} widths")
    layers, channels = [], in_channels
    for width, stride in zip(widths, strides):
        layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False), norm(width),
                   nn.ReLU(inplace=True)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def torchvision_resnet18(num_classes: int = NUM_CLASSES) -> Optional[nn.Module]:
    """torchvision's resnet18 (random weights), or None where torchvision does not import."""
    try:
        from torchvision.models import resnet18
    except Exception:  # not installed, or a build that does not match torch
        return None
    return resnet18(weights=None, num_classes=num_classes)


def with_layer(model: nn.Module, layer: str, backend: Optional[str] = None) -> nn.Module:
    """A copy of ``model`` (built with ``nn.BatchNorm2d``) with every BatchNorm converted by
    ``convert_model``: ``bn`` (no conversion), ``stoch_norm`` (p = 0.5), ``bgn G=<spec>``
    (``small_bgn_groups``), ``cbn`` (window 4, bound to each conv feeding a BatchNorm)."""
    model = copy.deepcopy(model)
    if layer == "bn":
        return model
    if layer == "stoch_norm":
        return convert_model(model, "stochnorm", p=STOCH_P, backend=backend)
    if layer.startswith("bgn G="):
        spec = layer[len("bgn G="):]
        small_bgn_groups(spec, 8)  # raises on a malformed spec before anything is converted
        return convert_model(model, "bgn", num_groups=lambda C: small_bgn_groups(spec, C), backend=backend)
    if layer == "cbn":
        return convert_model(model, "cbn", window=CBN_WINDOW, backend=backend)
    raise ValueError(f"with_layer: layer must be bn, stoch_norm, 'bgn G=<spec>' or cbn; got {layer!r}")


class TrainingStep:
    """One SGD step (momentum 0.9) of a classifier on a fixed batch: zero the gradients,
    forward, cross-entropy, backward, update. Calling it runs one step."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, lr: float = 0.01):
        self.model, self.inputs, self.targets = model.train(), inputs, targets
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(self.model(self.inputs), self.targets)
        loss.backward()
        self.optimizer.step()
        return loss


def training_step(model: nn.Module, shape: Sequence[int] = NETWORK_INPUT, device="cpu", seed: int = 0,
                  num_classes: int = NUM_CLASSES) -> TrainingStep:
    """A ``TrainingStep`` of ``model`` (moved to ``device``) on a random batch of ``shape``
    with random labels (seeded: every model of a comparison sees the same batch)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(tuple(shape), generator=generator).to(device)
    targets = torch.randint(0, num_classes, (shape[0],), generator=generator).to(device)
    return TrainingStep(model.to(device), inputs, targets)
