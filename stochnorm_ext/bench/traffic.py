"""Bytes moved: the minimum a normalisation must move, the two-pass estimate, what a backend
reports for its kernels, and what eager aten ops move (counted while they run)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from stochnorm_ext import backend as registry
from stochnorm_ext.bench.cases import BACKEND_LAYER, Case, base_layer


def minimum_bytes(direction: str, numel: int, element_size: int) -> int:
    """The least a normalisation can move: fwd reads x and writes y; bwd reads x and dy and
    writes dx (per-channel parameters and statistics are negligible and left out)."""
    tensors = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction]
    return tensors * numel * element_size


def two_pass_bytes(direction: str, numel: int, element_size: int) -> int:
    """The estimate for a two-pass kernel: fwd reads x twice (statistics, then apply) and
    writes y; bwd reads x and dy twice (reductions, then apply) and writes dx."""
    tensors = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[direction]
    return tensors * numel * element_size


def kernel_bytes(backend_module, layer: str, direction: str, numel: int, element_size: int
                 ) -> Optional[int]:
    """What the backend says its kernels move, or None when it has no ``bytes_moved``."""
    report = getattr(backend_module, "bytes_moved", None)
    if report is None:
        return None
    try:
        parts = [report(BACKEND_LAYER[base_layer(layer)], d, numel, element_size) for d in direction.split("+")]
    except Exception:  # an unsupported layer/direction: fall back to the estimate
        return None
    return None if any(p is None for p in parts) else int(sum(parts))


def _tensor_bytes(values) -> int:
    total = 0
    for v in values:
        if isinstance(v, Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += _tensor_bytes(v)
    return total


class OpBytesCounter(TorchDispatchMode):
    """Counts the bytes that eager aten ops move, assuming no cache reuse between ops.

    Each op reads its tensor arguments and writes its outputs once. Views (outputs that
    alias an input without writing it) and allocations move nothing; ops that overwrite
    their first argument (``copy_``, ``fill_``, ``zero_``) do not read it. A batch-norm op
    in training makes a second pass over its big inputs (statistics, then apply), like the
    two-pass estimate. ``ops`` records the op names that ran.
    """

    _NO_READ_OF_SELF = ("copy_", "fill_", "zero_")

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        self.ops.append(name)
        returns = func._schema.returns
        is_view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                        for r in returns)
        if is_view or name.startswith("empty"):
            return out
        inputs = list(args) + list(kwargs.values())
        if name.endswith(self._NO_READ_OF_SELF):
            inputs = inputs[1:]
        moved = _tensor_bytes(inputs) + _tensor_bytes([out])
        if "batch_norm" in name and self._training(func, args, kwargs):
            # The second pass reads the input again (and the output gradient in backward).
            big = [a for a in args[:2 if "backward" in name else 1] if isinstance(a, Tensor)]
            moved += _tensor_bytes(big)
        self.bytes += moved
        return out

    @staticmethod
    def _training(func, args, kwargs) -> bool:
        if "cudnn_batch_norm_backward" in func._schema.name:
            return True  # cuDNN's backward always uses the batch statistics
        for i, arg in enumerate(func._schema.arguments):
            if arg.name in ("training", "train"):
                return bool(kwargs.get(arg.name, args[i] if i < len(args) else False))
        return False


def counted_op_bytes(subject, x: Tensor, dy: Tensor, direction: str) -> int:
    """Bytes the eager ops of ``subject`` move in ``direction`` (see OpBytesCounter)."""
    total = 0
    if "fwd" in direction:
        with OpBytesCounter() as counter:
            subject.forward(x)
        total += counter.bytes
    if "bwd" in direction:
        y = subject.forward(x)
        with OpBytesCounter() as counter:
            torch.autograd.grad(y, [x] + subject.params, dy)
        total += counter.bytes
    return total


def bytes_for(subject, case: Case, direction: str, inputs) -> Tuple[Optional[int], str]:
    """The bytes a subject moves in a direction and where the number comes from (the
    ``bytes`` column: kernel, est, ops or -)."""
    if subject.bytes_source == "-":
        return None, "-"
    if subject.bytes_source == "ops":
        x, dy = inputs[0]
        return counted_op_bytes(subject, x, dy, direction), "ops"
    if subject.backend is not None:
        module = registry.resolve(subject.backend, torch.device(case.device))
        reported = kernel_bytes(module, subject.layer, direction, case.numel, case.element_size)
        if reported is not None:
            return reported, "kernel"
    return two_pass_bytes(direction, case.numel, case.element_size), "est"
