"""Allocation and launches of the Triton provider (no Triton needed here).

Every launch of the ops (each Triton kernel: the step count is incremented inside the stats
kernel) goes through :func:`launch`, which records it while :func:`recording` is active: the
launch count per op is a tested fact (tests/test_triton_ops.py), not a comment.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from torch import Tensor

from ... import _environ

POISON_ENV = "STOCHNORM_EXT_POISON_OUTPUTS"

_log: Optional[List[str]] = None


_read_poison = _environ.reader(POISON_ENV)


def poison(t: Tensor) -> Tensor:
    """NaN-fill a fresh output when STOCHNORM_EXT_POISON_OUTPUTS=1: an element a kernel
    forgets to write then fails every comparison."""
    if _read_poison() == "1":
        t.fill_(float("nan"))
    return t


def new(size, dtype, device) -> Tensor:
    return poison(torch.empty(size, dtype=dtype, device=device))


@contextlib.contextmanager
def recording():
    """Record the launches of the ops called inside: yields the list of their names, in
    launch order (a kernel's ``__name__``-like name)."""
    global _log
    saved, _log = _log, []
    try:
        yield _log
    finally:
        _log = saved


def record(name: str) -> None:
    if _log is not None:
        _log.append(name)


def kernel_name(kernel) -> str:
    """The Python name of a (possibly wrapped or interpreted) Triton kernel."""
    for obj in (kernel, getattr(kernel, "kernel", None), getattr(kernel, "fn", None)):
        fn = getattr(obj, "fn", obj)
        name = getattr(fn, "__name__", None)
        if name is not None:
            return name
    return repr(kernel)


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, recorded. ``kernel`` is ``wrap_triton(<global name>)``
    at the call site: torch's triton_op finds an op's kernels by reading its source for that
    pattern (its compile cache key), so the wrap stays where the kernel is named."""
    record(kernel_name(kernel))
    kernel[grid](*args, **meta)
