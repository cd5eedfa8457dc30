"""``convert_model``: swap a model's BatchNorm layers for StochNorm, BGN or CBN."""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .._rules import grouping
from .conv_bn import feeders_by_order, single_feeders, trace_feeders
from ..nn import (LAYER_TYPES, BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d,
                      CrossIterationBatchNorm2d, StochNorm1d, StochNorm2d, StochNorm3d)

__all__ = ["convert_model", "convert_sync", "find_conv_bn_pairs"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_KINDS = ("stochnorm", "bgn", "cbn")
# Options each kind accepts besides those copied from the BatchNorm being replaced.
_OPTIONS = {
    "stochnorm": {"p", "eps", "momentum", "backend", "sync", "process_group"},
    "bgn": {"num_groups", "eps", "momentum", "affine", "track_running_stats", "backend", "sync",
            "process_group"},
    "cbn": {"window", "burnin", "rho", "eps", "momentum", "backend", "sync", "process_group"},
}


def _bn_dims(bn: nn.Module, conv: Optional[nn.Module]) -> int:
    """1, 2 or 3: from the BatchNorm class, else (SyncBatchNorm) from the conv feeding it."""
    for cls, d in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
        if type(bn) is cls or (isinstance(bn, cls) and not isinstance(bn, nn.SyncBatchNorm)):
            return d
    for cls, d in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3), (nn.Linear, 1)):
        if isinstance(conv, cls):
            return d
    return 2


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    """Copy affine parameters (as new tensors) and keep requires_grad, device and dtype."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            s, d = getattr(src, name, None), getattr(dst, name, None)
            if s is not None and d is not None:
                setattr(dst, name, nn.Parameter(s.detach().clone(), requires_grad=s.requires_grad))


def _copy_running(src: nn.Module, dst: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    if getattr(dst, "running_mean", None) is None:
        return
    dst.running_mean = mean.detach().clone().to(src.running_mean.dtype)
    dst.running_var = var.detach().clone().to(src.running_var.dtype)
    dst.num_batches_tracked = src.num_batches_tracked.detach().clone()


def _pooled_group_stats(mean: torch.Tensor, var: torch.Tensor, num_groups: int):
    """BN running statistics -> BGN group statistics (docs/SPEC.md): for G | C the group pools its
    channels (mean of means; mean of variances plus the spread of the means); for G = m*C each
    channel's statistics are replicated to its m pieces."""
    pieces, channels_per_group = grouping(mean.numel(), num_groups)
    if pieces == 1:
        m = mean.double().view(num_groups, -1)
        v = var.double().view(num_groups, -1)
        gm = m.mean(1)
        gv = v.mean(1) + ((m - gm[:, None]) ** 2).mean(1)
        return gm, gv
    return mean.repeat_interleave(pieces), var.repeat_interleave(pieces)


def _fits(C: int, G: int) -> bool:
    try:
        grouping(C, G)
    except ValueError:
        return False
    return True


def _resolve_groups(num_groups, C: int, name: str) -> int:
    G = num_groups(C) if callable(num_groups) else num_groups
    if G is None:
        raise ValueError("convert_model(kind='bgn') needs num_groups (an int or a function of the channel count)")
    if not isinstance(G, int) or isinstance(G, bool) or G < 1 or not _fits(C, G):
        raise ValueError(f"convert_model: num_groups={G!r} does not fit layer {name!r} with {C} channels "
                         "(it must divide the channel count or be a multiple of it)")
    return G


def _make(kind: str, bn: nn.Module, conv: Optional[nn.Module], name: str, options: dict) -> nn.Module:
    C = bn.num_features
    dims = _bn_dims(bn, conv)
    get = lambda key, default: options[key] if key in options else default  # noqa: E731
    eps = get("eps", bn.eps)
    momentum = get("momentum", bn.momentum)
    backend = options.get("backend")
    # A BatchNorm(bias=False) stays without a shift: the converted model gains no parameter.
    common = dict(backend=backend, sync=get("sync", False), process_group=get("process_group", None),
                  bias=not bn.affine or bn.bias is not None)
    if kind == "stochnorm":
        if not bn.track_running_stats:
            raise ValueError(f"convert_model: {name!r} has no running statistics, which StochNorm needs")
        cls = {1: StochNorm1d, 2: StochNorm2d, 3: StochNorm3d}[dims]
        new = cls(C, eps=eps, momentum=momentum, affine=bn.affine, p=get("p", 0.5), **common)
        _copy_params(bn, new)
        _copy_running(bn, new, bn.running_mean, bn.running_var)
    elif kind == "bgn":
        G = _resolve_groups(options.get("num_groups"), C, name)
        cls = {1: BatchGroupNorm1d, 2: BatchGroupNorm2d, 3: BatchGroupNorm3d}[dims]
        new = cls(C, G, eps=eps, momentum=momentum, affine=get("affine", bn.affine),
                  track_running_stats=get("track_running_stats", bn.track_running_stats), **common)
        _copy_params(bn, new)
        if bn.track_running_stats and new.track_running_stats:
            _copy_running(bn, new, *_pooled_group_stats(bn.running_mean, bn.running_var, G))
    else:
        new = CrossIterationBatchNorm2d(C, window=get("window", 4), burnin=get("burnin", 0),
                                        rho=get("rho", 1.0), eps=eps, momentum=momentum,
                                        affine=bn.affine, track_running_stats=bn.track_running_stats,
                                        **common)
        _copy_params(bn, new)
        if bn.track_running_stats:
            _copy_running(bn, new, bn.running_mean, bn.running_var)
    ref = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    if ref is not None:
        new.to(device=ref.device)
    new.train(bn.training)
    return new


def find_conv_bn_pairs(model: nn.Module) -> Dict[str, str]:
    """Map each BatchNorm's qualified name to the name of the ``nn.Conv2d`` that feeds it
    directly (its only input, whose output goes nowhere else). Uses ``torch.fx`` tracing;
    where tracing fails, falls back to module order (a BN right after a Conv2d with as many
    output channels as the BN has features)."""
    return _feeding_modules(model, (nn.Conv2d,))


# Modules whose type tells a SyncBatchNorm's dimensionality.
_DIM_SOURCES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _feeding_modules(model: nn.Module, types) -> Dict[str, str]:
    """BN name -> name of the module of one of ``types`` that feeds it directly. A BN used
    at several places (one module, shared) is paired only if one module feeds every use.
    Untraceable models (data-dependent control flow, ...) are paired by module order."""
    try:
        feeders = trace_feeders(model, _BN_TYPES, types).feeders
    except Exception:
        feeders = feeders_by_order(model, _BN_TYPES, types)
    return single_feeders(feeders)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_model(model: nn.Module, kind: str, **options) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` of ``model`` in place
    and return the model.

    ``kind``:
      * ``"stochnorm"`` -> ``StochNorm*d``; options ``p`` (default 0.5), ``eps``,
        ``momentum``, ``backend``. Weights and running statistics are copied.
      * ``"bgn"`` -> ``BatchGroupNorm*d``; options ``num_groups`` (required: an int or a
        function of the channel count), ``eps``, ``momentum``, ``affine``,
        ``track_running_stats``, ``backend``. The running statistics are pooled per group
        (``G | C``) or replicated to the pieces (``G = m*C``).
      * ``"cbn"`` -> ``CrossIterationBatchNorm2d`` bound to the ``nn.Conv2d`` that feeds each
        BN (found with ``torch.fx``, or by module order where tracing fails); options
        ``window``, ``burnin``, ``rho``, ``eps``, ``momentum``, ``backend``. A BatchNorm that
        no conv feeds directly is left as it is, with a warning; so is a shared BatchNorm
        (one module used at several places) unless one and the same conv feeds every use
        (a CBN binds to a single conv).

    A BatchNorm used at several places (one module, shared) becomes one new module at all
    of them: the sharing is kept.

    Every kind also takes ``sync`` and ``process_group``: ``sync=True`` makes the new layers
    take their training statistics over the processes of ``process_group`` (None: the
    default group; see ``stochnorm_ext.distributed``).

    Options not given are taken from each BatchNorm (eps, momentum, affine,
    track_running_stats). Copies are made: the new layers share no tensor with the old.
    ``SyncBatchNorm`` becomes the variant matching the conv that feeds it (2d otherwise);
    it is synchronised only with ``sync=True`` (an ``nn.SyncBatchNorm`` silently stops
    syncing without an initialised process group, ours raise instead).
    """
    if kind not in _KINDS:
        raise ValueError(f"convert_model: kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise TypeError(f"convert_model(kind={kind!r}) got unknown options {sorted(unknown)}; "
                        f"it accepts {sorted(_OPTIONS[kind])}")
    if isinstance(model, _BN_TYPES):
        if kind == "cbn":
            raise ValueError("convert_model(kind='cbn') needs a model with the conv feeding the BatchNorm")
        return _make(kind, model, None, "", options)
    bns: List[Tuple[str, nn.Module]] = [(n, m) for n, m in model.named_modules() if isinstance(m, _BN_TYPES)]
    pairs = find_conv_bn_pairs(model) if bns else {}
    # SyncBatchNorm has no dimensionality of its own: take it from the module feeding it
    sources = (_feeding_modules(model, _DIM_SOURCES)
               if any(isinstance(m, nn.SyncBatchNorm) for _, m in bns) else pairs)
    modules = dict(model.named_modules())
    # Every place a BN sits (a shared BN has several); named_modules() names it by the first.
    places: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, _BN_TYPES):
            places.setdefault(id(m), []).append(n)
    skipped = []
    for name, bn in bns:
        conv = modules.get(pairs.get(name)) if name in pairs else None
        if kind == "cbn" and conv is None:
            skipped.append(name)
            continue
        source = modules.get(sources[name]) if name in sources else None
        new = _make(kind, bn, source, name, options)
        if kind == "cbn":
            new.bind(conv)
        for place in places[id(bn)]:  # a shared BN stays shared: one new module everywhere
            _set_submodule(model, place, new)
    if skipped:
        warnings.warn(f"convert_model(kind='cbn'): no nn.Conv2d feeds {skipped} directly (for a BatchNorm "
                      "used at several places: no single conv feeds every use); left as BatchNorm",
                      stacklevel=2)
    return model


def convert_sync(model: nn.Module, process_group=None) -> nn.Module:
    """Turn on synchronised statistics for every StochNorm, BGN and CBN layer of ``model``
    (in place; returns ``model``), over ``process_group`` (None: the default group; see
    ``stochnorm_ext.distributed``).

    The counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm`` for this package's layers;
    plain ``nn.BatchNorm*d`` layers are left alone (convert those with that function). To turn
    sync off again, set ``layer.sync = False`` on the layers.
    """
    for module in model.modules():
        if isinstance(module, LAYER_TYPES):  # Conv2dCBN's norm is one of them
            module.sync = True
            module.process_group = process_group
    return model
