"""The ``"cpu"`` backend (and, through ``cuda.py``, the ``"cuda"`` one): the C++ kernels of
``stochnorm_ext._C`` through the custom ops whose Python side is ``ops.py`` (the backend
interface of ``stochnorm_ext.backend.Backend``). Inputs
are validated by ``functional``; outputs keep the input's dtype and memory format.

Training is two ops: the layer's statistics op (batch statistics, the running-statistics EMA
and the step count, in place, in one coefficient step) and ``norm_apply`` (autograd in C++;
its backward is the one layer-agnostic ``norm_backward``). Eval of StochNorm and CBN with
running statistics is ``F.batch_norm``; of BGN one ``norm_apply`` with constant statistics.
The same functions serve CUDA tensors (``cuda.py``): the ops dispatch on the device.

``PASSES`` is the four segment passes on the kernels, which the distributed sync path
composes with collectives. If the extension is not built, ``UNAVAILABLE`` says why and the
package falls back to the reference backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch.nn.functional as TF
from torch import Tensor

try:
    from .ops import defaults as ops
except ImportError as exc:  # not built (or built against another torch): the message says which
    UNAVAILABLE = str(exc)
    ops = None

__all__ = ["stoch_norm", "batch_group_norm", "cross_iteration_norm", "PASSES"]


def stoch_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
    running_var: Tensor, mask: Optional[Tensor], training: bool, momentum: Optional[float], eps: float,
    update_stats: bool = True, num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """StochNorm: see ``reference.stoch_norm``. Batch-branch channels (``mask``) use this
    batch's statistics, the others the running statistics before this step's update."""
    if not training:
        return TF.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    center, var, red = ops.stoch_norm_stats(x, running_mean, running_var, mask, momentum,
                                            num_batches_tracked, update_stats)
    return ops.norm_apply(x, weight, bias, center, var, red, x.shape[1], eps)


def batch_group_norm(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
    momentum: Optional[float], eps: float, update_stats: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Batch Group Normalization: see ``reference.batch_group_norm``. Batch statistics in
    training and whenever there are no running statistics."""
    if training or running_mean is None:
        center, var, red = ops.batch_group_norm_stats(x, num_groups, running_mean, running_var, momentum,
                                                      num_batches_tracked, training and update_stats)
    else:
        center, var, red = running_mean, running_var, None
    return ops.norm_apply(x, weight, bias, center, var, red, num_groups, eps)


def cross_iteration_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor],
    past_mean: Tensor, past_var: Tensor, past_keep: Tensor,
    training: bool, momentum: Optional[float], eps: float, update_stats: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The normalisation step of CBN: see ``reference.cross_iteration_norm``. Returns
    ``(y, mu_t, var_t)``, the current batch's statistics being what the window stores."""
    if not training and running_mean is not None:
        y = TF.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        return y, running_mean.detach(), running_var.detach()
    mu_t, var_t, center, var, red = ops.cross_iteration_norm_stats(
        x, running_mean, running_var, past_mean, past_var, past_keep, momentum, num_batches_tracked,
        training and update_stats)
    return ops.norm_apply(x, weight, bias, center, var, red, x.shape[1], eps), mu_t, var_t


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
