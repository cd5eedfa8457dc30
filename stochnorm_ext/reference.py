"""Pure-PyTorch reference implementations: the executable form of docs/SPEC.md.

Written for clarity, never for speed. Every compiled backend is tested against these
functions (in float64 where possible). Gradients come from autograd through the plain
forward formulas, so they are an independent check of the hand-derived backward
formulas in the kernels.

All three functions share one interface with the other backends (see ``stochnorm_ext.backend.Backend``):
they take validated inputs (``stochnorm_ext.functional`` validates), update running
statistics in place when ``training and update_stats``, and return outputs in the
input's dtype and memory format. Statistics are computed in float32 (float64 for float64
input) with ``torch.var_mean``, which is stable for data with a large common offset.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ._checks import stat_dims
# CBN's window steps, plain PyTorch: the reference's are the definitions themselves.
from .cbn_window import compensated_past, push_entry  # noqa: F401
from ._rules import accumulate_dtype, memory_format_of

__all__ = ["stoch_norm", "batch_group_norm", "cross_iteration_norm", "pool_window", "update_running_stats",
           "compensated_past", "push_entry", "PASSES"]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """View a (C,) tensor so it broadcasts over x's channel dim."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def affine(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    if weight is not None:
        z = z * _per_channel(weight.to(z.dtype), z)
    if bias is not None:
        z = z + _per_channel(bias.to(z.dtype), z)
    return z


def finish(y: Tensor, x: Tensor) -> Tensor:
    """Back to the input's dtype and memory format."""
    return y.to(x.dtype).contiguous(memory_format=memory_format_of(x))


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, batch_var: Tensor,
    count: Union[int, Tensor], momentum: Optional[float], num_batches_tracked: Optional[Tensor] = None,
) -> None:
    """EMA update exactly like ``nn.BatchNorm``: the running variance takes the unbiased
    batch variance ``var * M / (M - 1)`` (``count`` = M, an int or a tensor). When
    ``num_batches_tracked`` is given it is incremented first; ``momentum=None`` then takes the
    cumulative factor ``1 / num_batches_tracked`` from the tensor (no host synchronisation)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if num_batches_tracked is None:
            raise RuntimeError("update_running_stats: momentum=None (cumulative average) needs num_batches_tracked")
        momentum = 1.0 / num_batches_tracked.to(running_mean.dtype)
        unbiased_var = batch_var * (count / (count - 1))
        running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype) * momentum)
        running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.dtype) * momentum)
        return
    unbiased_var = batch_var * (count / (count - 1))
    running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.dtype), alpha=momentum)


@torch.no_grad()
def _count_step(num_batches_tracked: Tensor) -> None:
    """A training step without running statistics still counts (the backends' contract)."""
    num_batches_tracked.add_(1)


def _eval_batch_norm(x, weight, bias, running_mean, running_var, eps) -> Tensor:
    acc = accumulate_dtype(x)
    mean = _per_channel(running_mean.to(acc), x)
    invstd = _per_channel(torch.rsqrt(running_var.to(acc) + eps), x)
    return finish(affine((x.to(acc) - mean) * invstd, weight, bias), x)


def stoch_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
    running_var: Tensor, mask: Optional[Tensor], training: bool, momentum: Optional[float], eps: float,
    update_stats: bool = True, num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """StochNorm (docs/SPEC.md). In training, channel c is normalised with this batch's
    statistics where ``mask[c]`` is True, else with the running statistics as they were
    *before* this step's update; the running statistics are then updated from the batch
    statistics, whatever the mask. Eval is plain BatchNorm with the running statistics.

    The published code saves the running buffers by reference in autograd and then updates
    them in place, so its moving branch gets the gradient of the *updated* variance. Here
    the pre-update statistics are snapshot first, so the gradient is exact.
    """
    if not training:
        return _eval_batch_norm(x, weight, bias, running_mean, running_var, eps)
    acc = accumulate_dtype(x)
    xf = x.to(acc)
    batch_var, batch_mean = torch.var_mean(xf, dim=stat_dims(x), correction=0)
    # Snapshot: the moving branch uses the statistics before this step's update.
    moving_mean = running_mean.detach().to(acc).clone()
    moving_var = running_var.detach().to(acc).clone()
    mean = torch.where(mask, batch_mean, moving_mean)
    var = torch.where(mask, batch_var, moving_var)
    z = (xf - _per_channel(mean, x)) * _per_channel(torch.rsqrt(var + eps), x)
    y = finish(affine(z, weight, bias), x)
    if update_stats:
        count = xf.numel() // xf.shape[1]
        update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum,
                             num_batches_tracked)
    return y


def batch_group_norm(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
    momentum: Optional[float], eps: float, update_stats: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Batch Group Normalization (docs/SPEC.md): each sample flattened in logical ``(C, *S)``
    order and cut into ``num_groups`` contiguous pieces; one mean/variance per group over
    the batch and the piece, ``M = N * C * S / G``. This is the paper's
    ``reshape(N, G, -1)`` with statistics over dims 0 and 2; ``reshape`` follows the
    logical order, so channels_last inputs group exactly like contiguous ones.
    Batch statistics are used in training and whenever there are no running statistics.
    """
    N = x.shape[0]
    acc = accumulate_dtype(x)
    grouped = x.to(acc).reshape(N, num_groups, -1)
    if training or running_mean is None:
        var, mean = torch.var_mean(grouped, dim=(0, 2), correction=0)
        if training and update_stats and running_mean is not None:
            count = N * grouped.shape[2]
            update_running_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
        elif training and update_stats and num_batches_tracked is not None:
            _count_step(num_batches_tracked)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    z = (grouped - mean.view(1, -1, 1)) * torch.rsqrt(var + eps).view(1, -1, 1)
    return finish(affine(z.reshape(x.shape), weight, bias), x)


def pool_window(mu_t: Tensor, var_t: Tensor, past_mean: Tensor, past_var: Tensor, past_keep: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """CBN's pooled statistics: the current ``mu_t``/``var_t`` (C,) with the kept compensated
    past entries (K, C), all in ``mu_t``'s dtype. Returns ``(mu, var, count)``, ``count_c =
    1 + kept entries`` (see :func:`cross_iteration_norm`; the synchronised path uses it too)."""
    acc = mu_t.dtype
    keep = past_keep.to(torch.bool)
    p_mean = torch.where(keep, past_mean.to(acc), 0)
    p_var = torch.where(keep, past_var.to(acc), 0)
    count = 1 + keep.sum(0).to(acc)
    mu = (mu_t + p_mean.sum(0)) / count
    spread = (mu_t - mu) ** 2 + torch.where(keep, (p_mean - mu) ** 2, 0).sum(0)
    var = (var_t + p_var.sum(0) + spread) / count
    return mu, var, count


def cross_iteration_norm(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
    running_mean: Optional[Tensor], running_var: Optional[Tensor],
    past_mean: Tensor, past_var: Tensor, past_keep: Tensor,
    training: bool, momentum: Optional[float], eps: float, update_stats: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The normalisation step of Cross-Iteration BN (docs/SPEC.md).

    ``past_mean``/``past_var`` (K, C) are the compensated statistics of the stored steps
    (constants: no gradient flows into them), ``past_keep`` (K, C) bool says which of them
    count for each channel. With ``count_c = 1 + kept entries``::

        mu  = (mu_t + sum mu') / count
        var = (var_t + sum var') / count + mean over kept entries (current one included) of (mu_e - mu)^2

    which equals the published ``mean(nu) - mu^2`` without its cancellation. The running
    statistics follow the *current* batch (EMA of ``mu_t`` and the unbiased ``var_t``).
    Returns ``(y, mu_t, var_t)``; the current statistics (detached, accumulation dtype) are
    what the window stores. Eval with running statistics is plain BatchNorm.
    """
    if not training and running_mean is not None:
        y = _eval_batch_norm(x, weight, bias, running_mean, running_var, eps)
        return y, running_mean.detach(), running_var.detach()
    acc = accumulate_dtype(x)
    xf = x.to(acc)
    var_t, mu_t = torch.var_mean(xf, dim=stat_dims(x), correction=0)
    mu, var, _ = pool_window(mu_t, var_t, past_mean, past_var, past_keep)
    z = (xf - _per_channel(mu, x)) * _per_channel(torch.rsqrt(var + eps), x)
    y = finish(affine(z, weight, bias), x)
    if training and update_stats and running_mean is not None:
        n = xf.numel() // xf.shape[1]
        update_running_stats(running_mean, running_var, mu_t, var_t, n, momentum, num_batches_tracked)
    elif training and update_stats and num_batches_tracked is not None:
        _count_step(num_batches_tracked)
    return y, mu_t.detach(), var_t.detach()


# ------------------------------------------------------------------------------- the four passes
# The per-segment passes that ``stochnorm_ext.distributed`` composes with collectives (the
# op contract's ``segment_*`` ops, in plain PyTorch): the passes of every backend without
# kernels for them, and what the kernels' passes are tested against. A segment is one
# channel (``pieces = 1``) or one of ``pieces`` contiguous runs of a channel's flattened
# spatial positions; tables are (C, pieces), statistics float64, the rest in the tables'
# dtype (the accumulation dtype).

def _segments(x: Tensor, pieces: int) -> Tensor:
    """x (N, C, *S) in the accumulation dtype, viewed as (N, C, pieces, S / pieces)."""
    N, C = x.shape[:2]
    return x.to(accumulate_dtype(x)).reshape(N, C, pieces, math.prod(x.shape[2:]) // pieces)


def _table(t: Tensor) -> Tensor:
    """A (C, P) table broadcast over (N, C, P, L)."""
    return t.unsqueeze(0).unsqueeze(-1)


class _PlainPasses:
    """``stats``, ``apply``, ``grad_sums``, ``grad_apply``: one object, as each backend's
    ``PASSES`` (so a caller picks a backend's passes by attribute, never by module name)."""

    @staticmethod
    def stats(x: Tensor, pieces: int) -> Tuple[Tensor, Tensor]:
        """float64 (mean, m2) per segment, as the kernels' segment_stats: computed on the
        values minus each segment's first value, so that the means keep their digits at a
        large common offset (segments and ranks are merged by their means' differences)."""
        xs = _segments(x, pieces)
        if xs.numel() == 0:
            zeros = xs.new_zeros(xs.shape[1:3], dtype=torch.float64)
            return zeros, zeros.clone()
        shift = xs[:1, :, :, :1]
        var, mean = torch.var_mean(xs - shift, dim=(0, 3), correction=0)
        return shift.reshape(mean.shape).double() + mean.double(), var.double() * (xs.shape[0] * xs.shape[3])

    @staticmethod
    def apply(x: Tensor, center: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """y = (x - center) * scale + shift per segment, in x's dtype and memory format."""
        xs = _segments(x, center.shape[1])
        y = (xs - _table(center)) * _table(scale) + _table(shift)
        return finish(y.reshape(x.shape), x)

    @staticmethod
    def grad_sums(dy: Tensor, x: Tensor, center: Tensor) -> Tuple[Tensor, Tensor]:
        """Per segment: sum(dy), sum(dy * (x - center)), in the tables' dtype."""
        pieces = center.shape[1]
        dys, xs = _segments(dy, pieces).to(center.dtype), _segments(x, pieces)
        return dys.sum((0, 3)), (dys * (xs - _table(center))).sum((0, 3))

    @staticmethod
    def grad_apply(dy: Tensor, x: Tensor, center: Tensor, k_dy: Tensor, k_x: Tensor, k_0: Tensor) -> Tensor:
        """dx = k_dy * dy + k_x * (x - center) + k_0 per segment, in x's dtype and memory format."""
        pieces = center.shape[1]
        dys, xs = _segments(dy, pieces).to(center.dtype), _segments(x, pieces)
        dx = _table(k_dy) * dys + _table(k_x) * (xs - _table(center)) + _table(k_0)
        return finish(dx.reshape(x.shape), x)


PASSES = _PlainPasses()
