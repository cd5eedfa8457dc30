"""The ``"cpu"`` backend (and, through ``cuda.py``, the ``"cuda"`` one): the C++ kernels of
``stochnorm_ext._C`` through the custom ops whose Python side is ``ops.py`` (the backend
interface of ``stochnorm_ext.backend.Backend``, composed over the ops by ``..layers``; the
autograd of ``norm_apply`` is C++, csrc/autograd.cpp). The same functions serve CUDA tensors
(``cuda.py``): the ops dispatch on the device.

``PASSES`` is the four segment passes on the kernels, which the distributed sync path
composes with collectives. If the extension is not built, ``UNAVAILABLE`` says why and the
package falls back to the reference backend.
"""
from __future__ import annotations

from ..layers import KernelLayers, ProviderOps

try:
    from .ops import defaults as ops
except ImportError as exc:  # not built (or built against another torch): the message says which
    UNAVAILABLE = str(exc)
    ops = None

__all__ = ["stoch_norm", "batch_group_norm", "cross_iteration_norm", "compensated_past", "push_entry", "PASSES"]


# The layer functions: the one composition of every provider over these ops.
if ops is not None:
    _layers = KernelLayers(ProviderOps(ops.stoch_norm_stats, ops.batch_group_norm_stats,
                                       ops.cross_iteration_norm_stats, ops.norm_apply,
                                       detach_stats_input=False,  # they run below autograd
                                       window_compensate=ops.cbn_window_compensate,
                                       window_store=ops.cbn_window_store))
    stoch_norm = _layers.stoch_norm
    batch_group_norm = _layers.batch_group_norm
    cross_iteration_norm = _layers.cross_iteration_norm
    compensated_past = _layers.compensated_past
    push_entry = _layers.push_entry


def _plain_passes():
    """The plain-PyTorch passes, for empty inputs (the kernels need at least one value)."""
    from ... import reference
    return reference.PASSES


class _KernelPasses:
    """The four segment passes on the kernels, ``torch.ops.stochnorm_ext.segment_*`` (the
    ``.default`` overloads): tables ``(C, P)`` in the accumulation dtype, statistics in
    float64. Empty inputs (numel 0) go to the plain-PyTorch passes."""

    @staticmethod
    def stats(x, pieces):
        if x.numel() == 0:
            return _plain_passes().stats(x, pieces)
        return ops.segment_stats(x, pieces)

    @staticmethod
    def apply(x, center, scale, shift):
        if x.numel() == 0:
            return _plain_passes().apply(x, center, scale, shift)
        return ops.segment_apply(x, center, scale, shift)

    @staticmethod
    def grad_sums(dy, x, center):
        if x.numel() == 0:
            return _plain_passes().grad_sums(dy, x, center)
        return ops.segment_grad_sums(dy, x, center)

    @staticmethod
    def grad_apply(dy, x, center, k_dy, k_x, k_0):
        if x.numel() == 0:
            return _plain_passes().grad_apply(dy, x, center, k_dy, k_x, k_0)
        return ops.segment_grad_apply(dy, x, center, k_dy, k_x, k_0)


PASSES = _KernelPasses()
