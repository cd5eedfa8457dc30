"""What one call costs the host besides its arithmetic: the ops it dispatches and, on CUDA,
the kernels it launches. Public (``stochnorm_ext.bench.count_ops`` / ``count_launches``):
tests and other code assert op and launch counts with them.

``count_ops`` counts every op that reaches the dispatcher's Python mode below autograd, so
what a call dispatches at top level: ATen ops, our ``stochnorm_ext::*`` ops, allocations
(``aten::empty``) and in-place updates, each once per call; ops that a compiled kernel
calls inside itself are not seen (they cost no dispatch from the caller). Views (an output
aliasing an input without writing it: ``view``, ``permute``, ``detach``, ...) are left out
(no data moves, no launch): ``OpCounter.views`` has them. Composite ops appear as the ops
they decompose into, as they run. A backward run inside the counter (``autograd.grad``,
``.backward()``) is counted too.
"""
from __future__ import annotations

import collections
from typing import Callable, Counter, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "count_ops", "count_launches"]


class OpCounter(TorchDispatchMode):
    """Context manager counting the ops dispatched inside it.

    ``total``: non-view ops; ``ops``: their names (``aten.add_.Tensor``, ...) with counts;
    ``views``: the view ops left out, with counts. ::

        with OpCounter() as counter:
            layer(x)
        assert counter.total <= 4, counter.ops
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = collections.Counter()
        self.views: Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.views if func.is_view else self.ops)[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[..., object], *args, calls: int = 1, **kwargs) -> int:
    """The non-view ops ``fn(*args, **kwargs)`` dispatches, per call (``calls`` calls
    counted; a count that differs between calls raises, so a per-call figure is never an
    average hiding a first-call path). Warm ``fn`` up first where its first calls differ
    (a CBN window filling, lazy initialisation)."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    totals = []
    for _ in range(calls):
        with OpCounter() as counter:
            fn(*args, **kwargs)
        totals.append(counter.total)
    if len(set(totals)) != 1:
        raise RuntimeError(f"the op count differs between calls ({totals}): warm the callable up first")
    return totals[0]


def _device_activity(event) -> bool:
    """A profiler event that ran on the GPU (a kernel, memcpy or memset)."""
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


def count_launches(fn: Callable[..., object], *args, calls: int = 1, **kwargs) -> Optional[int]:
    """Kernels (and memcpy / memset operations) ``fn(*args, **kwargs)`` puts on the GPU per
    call, from ``torch.profiler``'s CUDA activity (CUPTI). ``calls`` calls are profiled and
    the total divided by ``calls``; it must divide evenly (else RuntimeError: the calls
    differ, warm ``fn`` up first). Raises RuntimeError without a CUDA device."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    if not torch.cuda.is_available():
        raise RuntimeError("kernel launches are counted on a CUDA device; none is visible")
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args, **kwargs)
        torch.cuda.synchronize()
    total = sum(_device_activity(e) for e in prof.events())
    if total % calls:
        raise RuntimeError(f"{total} GPU activities over {calls} calls: the calls differ, warm the callable up first")
    return total // calls
