"""Which convolution feeds each normalisation layer of a model: the one graph helper behind
``convert_model`` (CBN binds a BatchNorm to its conv) and ``fold_into_conv`` (folds a
BatchNorm into its conv). The two callers then apply their own rule: conversion accepts a
BatchNorm shared by several uses if one conv feeds every use; folding needs each module
called once under one name."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import torch
from torch import nn

__all__ = ["ModelGraph", "trace_feeders", "feeders_by_order", "single_feeders"]


def out_features(module: nn.Module) -> Optional[int]:
    """The channel count a module produces (convs: out_channels; Linear: out_features)."""
    return getattr(module, "out_channels", getattr(module, "out_features", None))


class ModelGraph(NamedTuple):
    """``feeders``: for every normalisation module (by name), one entry per call: the name of
    the module of the feeding type whose output is that call's only argument and goes nowhere
    else, with as many output channels as the norm has features; None otherwise.
    ``calls``: how often each module is called in the traced forward."""
    feeders: Dict[str, List[Optional[str]]]
    calls: Dict[str, int]


def trace_feeders(model: nn.Module, norm_types, feeding_types,
                  tracer: Optional[torch.fx.Tracer] = None) -> ModelGraph:
    """The :class:`ModelGraph` of ``model`` from a ``torch.fx`` trace (``tracer``, or the
    default symbolic tracer). Raises whatever tracing raises (data-dependent control flow)."""
    graph = (tracer or torch.fx.Tracer()).trace(model)
    modules = dict(model.named_modules())
    feeders: Dict[str, List[Optional[str]]] = {}
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        calls[node.target] = calls.get(node.target, 0) + 1
        norm = modules.get(node.target)
        if not isinstance(norm, norm_types):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        fed = (isinstance(src, torch.fx.Node) and src.op == "call_module"
               and isinstance(modules.get(src.target), feeding_types) and len(src.users) == 1
               and out_features(modules[src.target]) == norm.num_features)
        feeders.setdefault(node.target, []).append(src.target if fed else None)
    return ModelGraph(feeders, calls)


def feeders_by_order(model: nn.Module, norm_types, feeding_types) -> Dict[str, List[Optional[str]]]:
    """For models that cannot be traced: a norm is fed by the leaf module registered right
    before it when that is of a feeding type with as many output channels (every use of a
    shared norm counted, by its first name)."""
    first_name = {id(m): n for n, m in reversed(list(model.named_modules()))}
    feeders: Dict[str, List[Optional[str]]] = {}
    prev = None
    for _, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, norm_types):
            fed = isinstance(prev, feeding_types) and out_features(prev) == module.num_features
            feeders.setdefault(first_name[id(module)], []).append(first_name[id(prev)] if fed else None)
        if not list(module.children()):
            prev = module
    return feeders


def single_feeders(feeders: Dict[str, List[Optional[str]]]) -> Dict[str, str]:
    """Norm name -> its feeder, for norms with one feeder for every use."""
    return {norm: srcs[0] for norm, srcs in feeders.items() if None not in srcs and len(set(srcs)) == 1}
