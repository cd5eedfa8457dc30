"""The ``"cpu"`` backend: the C++ kernels of ``stochnorm_ext._C`` through the custom ops of
``_ops.py``. Same interface and semantics as ``reference.py`` (see ``_backend.py``): inputs
are validated by ``functional``, running statistics are updated in place when
``training and update_stats``, outputs keep the input's dtype and memory format.

If the extension is not built, ``UNAVAILABLE`` says why and the package falls back to the
reference backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

try:
    from ._ops import defaults as ops
except ImportError as exc:  # not built (or built against another torch): the message says which
    UNAVAILABLE = str(exc)
    ops = None

__all__ = ["stoch_norm", "batch_group_norm", "cross_iteration_norm"]


def _values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def stoch_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
    running_var: Tensor, mask: Optional[Tensor], training: bool, momentum: float, eps: float,
    update_stats: bool = True, num_batches_tracked=None,
) -> Tensor:
    """StochNorm: see ``reference.stoch_norm``. Batch-branch channels (``mask``) use this
    batch's statistics, the others the running statistics before this step's update; each
    channel is normalised once. Eval: no mask, running statistics, nothing updated."""
    momentum = _step_factor(momentum, num_batches_tracked)
    y, batch_mean, batch_var, _, _ = ops.stoch_norm_forward(
        x, weight, bias, running_mean, running_var, mask if training else None, eps)
    if training and update_stats:
        ops.update_running_stats(running_mean, running_var, batch_mean, batch_var, _values_per_channel(x),
                                 momentum)
    return y


def batch_group_norm(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
    momentum: float, eps: float, update_stats: bool = True, num_batches_tracked=None,
) -> Tensor:
    """Batch Group Normalization: see ``reference.batch_group_norm``."""
    momentum = _step_factor(momentum, num_batches_tracked)
    use_batch_stats = training or running_mean is None
    y, batch_mean, batch_var, _, _ = ops.batch_group_norm_forward(
        x, num_groups, weight, bias, running_mean, running_var, use_batch_stats, eps)
    if training and update_stats and running_mean is not None:
        ops.update_running_stats(running_mean, running_var, batch_mean, batch_var, x.numel() // num_groups,
                                 momentum)
    return y


def cross_iteration_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor],
    past_mean: Tensor, past_var: Tensor, past_keep: Tensor,
    training: bool, momentum: float, eps: float, update_stats: bool = True, num_batches_tracked=None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The normalisation step of CBN: see ``reference.cross_iteration_norm``. Returns
    ``(y, mu_t, var_t)``, the current batch's statistics being what the window stores."""
    momentum = _step_factor(momentum, num_batches_tracked)
    use_batch_stats = training or running_mean is None
    y, mu_t, var_t, _, _ = ops.cross_iteration_norm_forward(
        x, weight, bias, running_mean, running_var, past_mean, past_var, past_keep, use_batch_stats, eps)
    if not use_batch_stats:
        return y, running_mean.detach(), running_var.detach()
    if training and update_stats and running_mean is not None:
        ops.update_running_stats(running_mean, running_var, mu_t, var_t, _values_per_channel(x), momentum)
    return y, mu_t, var_t


def _step_factor(momentum, num_batches_tracked):
    """Interim, until this provider takes num_batches_tracked into its statistics op: count
    the step and resolve momentum=None to the cumulative factor."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    return momentum


# The four per-segment passes that stochnorm_ext.distributed composes with collectives.
import torch  # noqa: E402

from . import reference as _reference  # noqa: E402


class PASSES:
    """The four per-segment passes (``reference.PASSES``'s interface) on this backend's
    kernels, ``torch.ops.stochnorm_ext.segment_*`` (the ``.default`` overloads, as
    ``_ops.defaults`` calls them); tables in the accumulation dtype, statistics in float64.
    Empty inputs take the plain-PyTorch passes (the kernels expect at least one value)."""

    @staticmethod
    def stats(x, pieces):
        if x.numel() == 0:
            return _reference.PASSES.stats(x, pieces)
        return torch.ops.stochnorm_ext.segment_stats.default(x, pieces)

    @staticmethod
    def apply(x, center, scale, shift):
        if x.numel() == 0:
            return _reference.PASSES.apply(x, center, scale, shift)
        return torch.ops.stochnorm_ext.segment_apply.default(x, center, scale, shift)

    @staticmethod
    def grad_sums(dy, x, center):
        if x.numel() == 0:
            return _reference.PASSES.grad_sums(dy, x, center)
        return torch.ops.stochnorm_ext.segment_grad_sums.default(dy, x, center)

    @staticmethod
    def grad_apply(dy, x, center, k_dy, k_x, k_0):
        if x.numel() == 0:
            return _reference.PASSES.grad_apply(dy, x, center, k_dy, k_x, k_0)
        return torch.ops.stochnorm_ext.segment_grad_apply.default(dy, x, center, k_dy, k_x, k_0)
