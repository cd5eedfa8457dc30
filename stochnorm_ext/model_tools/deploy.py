"""Deploy without the extension: turn a model that uses our layers into plain PyTorch.

In eval every layer of this package is a fixed affine map per channel (BGN with
``num_groups > num_features``: per channel and spatial piece), so a fine-tuned model can
run, be folded and be exported without ``stochnorm_ext``:

1. :func:`to_batchnorm` replaces StochNorm, BGN and CBN layers by ``nn.BatchNorm1d/2d/3d``
   (BGN with ``G > C`` by :class:`PiecewiseAffine`) and removes CBN's forward hooks;
2. :func:`fold_into_conv` folds each BatchNorm that directly follows a conv into the
   conv's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``);
3. the result exports with ``torch.export`` / ``torch.onnx.export`` as standard ops only.

Unconverted models export to ONNX as well: inside ``torch.onnx.export`` the layers compute
with the reference backend's plain PyTorch ops (``backend.resolve_for_call``), since the
kernels' custom ops have no ONNX translation.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .._rules import grouping, memory_format_of
from .conv_bn import trace_feeders
from ..nn import (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d, Conv2dCBN,
                      CrossIterationBatchNorm2d, StochNorm1d, StochNorm2d, StochNorm3d)

__all__ = ["to_batchnorm", "fold_into_conv", "PiecewiseAffine"]

# Our layers and the number of spatial dims of the nn.BatchNorm*d that replaces them.
_DIMS = {
    StochNorm1d: 1, StochNorm2d: 2, StochNorm3d: 3,
    BatchGroupNorm1d: 1, BatchGroupNorm2d: 2, BatchGroupNorm3d: 3,
    CrossIterationBatchNorm2d: 2,
}
_BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class PiecewiseAffine(nn.Module):
    """The eval-time form of a ``BatchGroupNorm`` with ``num_groups = m * num_features``:
    a fixed affine map per (channel, spatial piece), in plain PyTorch ops.

    For an input ``(N, C, *S)`` flattened over its spatial positions ``s`` (logical order,
    whatever the memory format), piece ``p = s // (S / m)`` and::

        y[n, c, s] = (x[n, c, s] - mean[c, p]) * scale[c, p] + shift[c, p]

    ``mean``, ``scale`` and ``shift`` are ``(C, m)`` buffers (no parameters): the BGN's
    running mean, ``weight / sqrt(running_var + eps)`` and ``bias``. Subtracting the mean
    first (instead of a single ``x * a + b``) keeps BGN's rounding for data with a large
    offset.

    Limits: eval only (training it would not normalise anything, so a forward in training
    mode raises ``RuntimeError``); the spatial size must be a multiple of ``m``, and since
    the statistics belong to spatial positions, the map is only meaningful at the
    resolution the BGN was trained at. Computes in the tables' dtype and returns the
    input's dtype and memory format. Exports (``torch.export``, ONNX) as elementwise ops.
    """

    def __init__(self, mean: Tensor, scale: Tensor, shift: Tensor):
        super().__init__()
        if mean.dim() != 2 or mean.shape != scale.shape or mean.shape != shift.shape:
            raise ValueError("PiecewiseAffine: mean, scale and shift must be (C, m) tables of one shape, "
                             f"got {tuple(mean.shape)}, {tuple(scale.shape)}, {tuple(shift.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    @property
    def num_features(self) -> int:
        """C, the channel count."""
        return self.scale.shape[0]

    @property
    def num_pieces(self) -> int:
        """m, the spatial pieces per channel."""
        return self.scale.shape[1]

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_pieces={self.num_pieces}"

    def forward(self, x: Tensor) -> Tensor:
        """Apply the map to ``x`` of shape ``(N, C, *S)``; returns a tensor like ``x``."""
        if self.training:
            raise RuntimeError("PiecewiseAffine is the eval-time form of a BatchGroupNorm (fixed "
                               "running statistics) and cannot train: call .eval()")
        C, m = self.scale.shape
        if x.dim() < 2 or x.shape[1] != C:
            raise ValueError(f"PiecewiseAffine: expected input (N, {C}, ...), got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        size = math.prod(spatial)
        if size % m:
            raise ValueError(f"PiecewiseAffine: the spatial size {spatial} ({size} positions) is not a "
                             f"multiple of the {m} pieces per channel")

        def table(t: Tensor) -> Tensor:
            # (C, m) -> (C, *S): piece p covers size // m consecutive flattened positions.
            return t[:, :, None].expand(C, m, size // m).reshape((C,) + spatial)

        compute = x if x.dtype == self.scale.dtype else x.to(self.scale.dtype)
        y = (compute - table(self.mean)) * table(self.scale) + table(self.shift)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.contiguous(memory_format=memory_format_of(x))


def _copy(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().clone()


def _batchnorm(layer: nn.Module, mean: Optional[Tensor], var: Optional[Tensor]) -> nn.Module:
    """An ``nn.BatchNorm*d`` with ``layer``'s eps, momentum and (copied) affine parameters,
    and the given running statistics (None: no running statistics, batch statistics in eval)."""
    bn = _BATCHNORM[_DIMS[type(layer)]](layer.num_features, eps=layer.eps, momentum=layer.momentum,
                                        affine=layer.affine, track_running_stats=mean is not None)
    if layer.affine:
        bn.weight = nn.Parameter(_copy(layer.weight), requires_grad=layer.weight.requires_grad)
        # A layer without a shift (bias=False) gives a BatchNorm without one (a None bias is
        # what nn.BatchNorm*d(bias=False) holds, and what older torch versions also accept).
        bn.bias = (None if layer.bias is None
                   else nn.Parameter(_copy(layer.bias), requires_grad=layer.bias.requires_grad))
    if mean is not None:
        bn.running_mean = _copy(mean)
        bn.running_var = _copy(var)
        bn.num_batches_tracked = _copy(layer.num_batches_tracked)
    bn.train(layer.training)
    return bn


@torch.no_grad()
def _piecewise(layer: nn.Module) -> PiecewiseAffine:
    """The (C, m) tables of a BGN with G = m * C (group g = channel g // m, piece g % m)."""
    C, m = layer.num_features, layer.num_groups // layer.num_features
    dtype = layer.running_mean.dtype
    mean = layer.running_mean.double().view(C, m)
    invstd = torch.rsqrt(layer.running_var.double().view(C, m) + layer.eps)
    weight = layer.weight.double()[:, None] if layer.affine else torch.ones_like(mean[:, :1])
    bias = layer.bias.double()[:, None] if layer.bias is not None else torch.zeros_like(mean[:, :1])
    new = PiecewiseAffine(mean.to(dtype), (weight * invstd).to(dtype), bias.expand(C, m).to(dtype))
    new.train(layer.training)
    return new


_BGN = (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d)


def _check_convertible(layer: nn.Module, name: str) -> None:
    """Raise ValueError for a layer with no fixed eval map (BGN without running statistics)."""
    if isinstance(layer, _BGN) and not layer.track_running_stats:
        label = f"{name!r} ({type(layer).__name__})" if name else type(layer).__name__
        raise ValueError(
            f"to_batchnorm: layer {label} has no running statistics (track_running_stats=False): in "
            "eval it normalises with the batch's group statistics, which no BatchNorm or fixed "
            "affine map reproduces. Keep the stochnorm_ext layer, or convert with track_running_stats=True.")


def _replacement(layer: nn.Module) -> Optional[nn.Module]:
    """The plain-PyTorch replacement of one of our layers (None for any other module)."""
    if isinstance(layer, Conv2dCBN):
        return nn.Sequential(OrderedDict(conv=layer.conv, norm=_replacement(layer.norm)))
    if type(layer) not in _DIMS:
        return None
    if not isinstance(layer, _BGN):
        return _batchnorm(layer, layer.running_mean, layer.running_var)  # StochNorm, CBN
    pieces, channels_per_group = grouping(layer.num_features, layer.num_groups)
    if pieces == 1:  # groups of whole channels: expand the group statistics to channels
        return _batchnorm(layer, layer.running_mean.repeat_interleave(channels_per_group),
                          layer.running_var.repeat_interleave(channels_per_group))
    return _piecewise(layer)


def _remove_our_hooks(model: nn.Module) -> None:
    """Unbind every CBN and drop any forward (pre-)hook defined in stochnorm_ext."""
    for module in model.modules():
        if isinstance(module, CrossIterationBatchNorm2d):
            module.unbind()
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if type(hook).__module__.startswith("stochnorm_ext"):
                    del hooks[key]
                    for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(module, extra, {}).pop(key, None)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every stochnorm_ext layer of ``model`` by plain PyTorch with the same eval output.

    * ``StochNorm1d/2d/3d`` and ``CrossIterationBatchNorm2d`` -> ``nn.BatchNorm1d/2d/3d`` with
      the same running statistics, affine parameters, eps and momentum (a CBN without
      running statistics becomes a BatchNorm without them: batch statistics in eval, as before).
      CBN's forward hooks on its conv are removed; ``Conv2dCBN`` becomes
      ``nn.Sequential(conv=..., norm=nn.BatchNorm2d)`` (same state-dict prefixes).
    * ``BatchGroupNorm*d`` with ``num_groups | num_features`` -> ``nn.BatchNorm*d`` whose
      per-channel running statistics are those of the channel's group (exact in eval).
    * ``BatchGroupNorm*d`` with ``num_groups = m * num_features`` -> :class:`PiecewiseAffine`
      (per channel and spatial piece; eval only).

    A layer used at several places (one module, shared) becomes one replacement at all of
    them. Returns the new model (``model`` itself when ``inplace``; otherwise ``model`` is left
    untouched and a deep copy is converted). It contains no stochnorm_ext layer or hook; its
    eval outputs equal the original's up to float rounding. Every replacement gets copies of
    the tensors, on their device and in their dtype, and keeps its layer's training flag.

    Limits: in *training* the result is a different model (BatchNorm statistics per channel
    and batch, not StochNorm's mix, BGN's groups or CBN's window); it is meant for inference.
    A BGN without running statistics raises ``ValueError`` (nothing is changed then). Custom
    code that calls a bound CBN with ``conv_input=`` must be adapted (``nn.BatchNorm2d``
    takes one input).
    """
    for name, module in model.named_modules():
        _check_convertible(module, name)  # before any change
    if not inplace:
        model = copy.deepcopy(model)
    _remove_our_hooks(model)
    root = _replacement(model)
    if root is not None:
        return root
    # remove_duplicate=False: a layer registered under two names is replaced under both.
    named = list(model.named_modules(remove_duplicate=False))
    done = []
    replaced: Dict[int, nn.Module] = {}  # a layer used at several places stays shared
    for name, module in named:
        if any(name.startswith(prefix + ".") for prefix in done):
            continue  # inside a Conv2dCBN already replaced
        new = replaced[id(module)] if id(module) in replaced else _replacement(module)
        if new is not None:
            replaced[id(module)] = new
            _set_submodule(model, name, new)
            done.append(name)
    return model


class _Tracer(torch.fx.Tracer):
    """Symbolic tracer that keeps PiecewiseAffine (shape checks in Python) as a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PiecewiseAffine) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model: nn.Module) -> Dict[str, str]:
    """{conv name: BatchNorm name} for each BatchNorm whose only input is a Conv1d/2d/3d whose
    output goes nowhere else, both called exactly once and registered under one name."""
    try:
        graph = trace_feeders(model, nn.modules.batchnorm._BatchNorm, _CONVS, _Tracer())
    except Exception as error:  # data-dependent control flow, ...
        raise RuntimeError(
            f"fold_into_conv: torch.fx cannot trace {type(model).__name__} ({error}), so its conv -> "
            "BatchNorm pairs are unknown. Use to_batchnorm alone, or fold known pairs with "
            "torch.nn.utils.fusion.fuse_conv_bn_eval.") from error
    modules = dict(model.named_modules())
    names_per_module: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        names_per_module[id(module)] = names_per_module.get(id(module), 0) + 1
    pairs = {}
    for bn_name, feeders in graph.feeders.items():
        conv_name = feeders[0]
        if (len(feeders) == 1 and conv_name is not None and modules[bn_name].running_mean is not None
                and graph.calls[conv_name] == 1
                and names_per_module[id(modules[conv_name])] == 1 and names_per_module[id(modules[bn_name])] == 1):
            pairs[conv_name] = bn_name
    return pairs


def fold_into_conv(model: nn.Module, inplace: bool = False) -> nn.Module:
    """:func:`to_batchnorm`, then fold each BatchNorm fed directly by a ``Conv1d/2d/3d`` into it.

    The conv gets ``weight * gamma / sqrt(running_var + eps)`` and the matching bias
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the BatchNorm becomes ``nn.Identity``.
    Pairs are found by ``torch.fx`` tracing: the BN's only input is the conv, the conv's
    output goes nowhere else, and neither module is called twice or shared. A BatchNorm not
    preceded by such a conv, one without running statistics, and :class:`PiecewiseAffine`
    stay as they are.

    Returns the folded model (``model`` itself when ``inplace``, else a converted copy); the
    model keeps its class and its eval outputs up to float rounding.

    Limits: the model must be in eval mode (``ValueError`` otherwise, raised before any
    change: folding gives the eval-time map); the model must be traceable by ``torch.fx``
    (``RuntimeError`` otherwise; with ``inplace`` the model has then already gone through
    ``to_batchnorm``). Forward hooks on a folded conv then see the normalised output.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"fold_into_conv: {training[:3]} {'are' if len(training) > 1 else 'is'} in "
                         "training mode; folding gives the eval-time map: call model.eval() first")
    model = to_batchnorm(model, inplace=inplace)
    for conv_name, bn_name in _conv_bn_pairs(model).items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, bn_name, nn.Identity().train(bn.training))
    return model
