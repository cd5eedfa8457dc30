"""Synchronised statistics across processes (``torch.distributed``), like ``nn.SyncBatchNorm``.

With ``sync=True`` (a layer argument, a ``convert_model`` option, or ``convert_sync``)
a *training* forward takes its statistics over the union of the batches of every process
of ``process_group`` (None: the default group), so W processes with batches
``n_1 .. n_W`` compute what one process computes on the concatenated batch: outputs, input
gradients, running statistics (``momentum=None`` included: the cumulative factor is read
from ``num_batches_tracked``) and CBN windows. Batch sizes may differ between processes
(an empty batch included: that process still takes part in every collective); statistics
are merged with their counts, and fewer than 2 values per statistic over the whole group
raises ValueError on every process. Parameter gradients stay local sums, as with
``nn.SyncBatchNorm``: ``DistributedDataParallel`` averages them. Eval never syncs (no
collective runs in eval). Every process of the group must run the layer's training
forward (and backward) the same number of times, as with any collective.

torch.compile: synchronised layers compile with ``fullgraph=True`` (tested with
``aot_eager``). Every collective is a functional one (``all_gather_tensor``, ``all_reduce`` of
``torch.distributed._functional_collectives``): dynamo traces it into the graph, eagerly it
runs as an ordinary collective; the backward's all-reduce lands in the compiled backward
graph. The value count stays a tensor, so the only host read of a training step is eager's
"fewer than 2 values" check; under compile and CUDA graph capture it is ``torch._assert_async``
instead: a RuntimeError (not ValueError) with the same message on every rank, before the
graph's buffer updates are written back (state untouched under ``aot_eager``; inductor
gives no such ordering promise).

One implementation serves every backend, composed like ``nn.SyncBatchNorm``
(``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``) from
the backend's four per-segment passes ``impl.PASSES`` (the op contract's ``segment_*``;
``reference.PASSES`` in plain PyTorch). Per layer and step::

    forward   PASSES.stats: local per-segment (count, mean, M2)
              all_gather; Chan merge in float64          _global_moments
              per-layer (center, var, red); EMA          tiny (C,) / (G,) tables
              PASSES.apply: (x - center) * scale + shift _SyncNormApply
    backward  PASSES.grad_sums: sum(dy), sum(dy (x - center)) per segment
              all_reduce in float64; k_x, k_0 from red   _grad_coefficients
              PASSES.grad_apply: k_dy dy + k_x (x - center) + k_0

Layer specifics:

* StochNorm uses the mask of the group's first rank on every rank (it travels in the same
  all-gather as the statistics), so the ranks never disagree even when their random
  generators do.
* BGN merges the statistics of each group's segments (whole channels for ``G | C``,
  one spatial piece of a channel for ``G = m * C``).
* CBN syncs the current statistics (the compensated past ones are the same on every rank:
  same window, same weights), pools them with ``reference.pool_window``, and averages the
  Jacobians ``dmu``/``dvar`` with count weights (:func:`conv_jacobians`), so every rank
  stores the same window entry. The eager module overlaps that all-reduce with the rest of
  the step (:func:`push_entry_deferred`, which says when the entry lands); the functional
  form and compiled steps wait for it within the step.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._rules import accumulate_dtype, grouping
from .cbn_window import CBNWindow, ConvGeometry, push_entry
from .cbn_window import conv_jacobians as _local_conv_jacobians
from .reference import pool_window, update_running_stats

__all__ = ["check_ready", "stoch_norm", "batch_group_norm", "cross_iteration_norm",
           "conv_jacobians", "push_entry_deferred", "PendingEntry"]


def _funcol():
    """``torch.distributed._functional_collectives``, imported on first use: it imports
    torch._dynamo and Triton, which ``import stochnorm_ext`` must not pay for (over a second;
    and Triton must load after ``TRITON_INTERPRET`` is set, e.g. by the self-check)."""
    from torch.distributed import _functional_collectives
    return _functional_collectives


def check_ready(process_group, layer: str) -> None:
    """Raise a RuntimeError naming what is missing when a synchronised training forward
    cannot run: torch.distributed unavailable or not initialised, or this process not a
    member of ``process_group``."""
    if not dist.is_available():
        raise RuntimeError(f"{layer}: sync=True needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            f"{layer}: sync=True in training needs an initialised process group; call "
            "torch.distributed.init_process_group(...) first, or use sync=False (eval never syncs)")
    if process_group is not None and dist.get_rank(process_group) < 0:
        raise RuntimeError(f"{layer}: this process (global rank {dist.get_rank()}) is not a member "
                           "of the process_group given for sync")


def _passes(impl):
    """The backend's four passes (every backend declares its ``PASSES``: the Backend protocol)."""
    return impl.PASSES


def _group(process_group):
    """The group the functional collectives run on (None: the default group)."""
    return dist.group.WORLD if process_group is None else process_group


def _host_may_sync(x: Tensor) -> bool:
    """Whether a check may read a device value on the host: not while compiling (the graph
    would break) nor while a CUDA graph is being captured (a sync there fails the capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_cumulative(momentum, num_batches_tracked, updates: bool, layer: str) -> None:
    """``momentum=None`` reads its factor from ``num_batches_tracked``: refused without it,
    before any collective runs (every rank raises alike, nothing has changed)."""
    if updates and momentum is None and num_batches_tracked is None:
        raise RuntimeError(f"{layer}: momentum=None (cumulative average) needs num_batches_tracked, got None")


# ------------------------------------------------------------------------------- statistics
class _Moments(NamedTuple):
    """Statistics merged over every rank of the group and ``k`` consecutive segments."""
    count: Tensor     # () float64: values per statistic, all ranks together (a tensor: no host sync)
    mean: Tensor      # (num_stats,) float64
    var: Tensor       # (num_stats,) float64, biased
    extra: Optional[Tensor]  # the first rank's ``extra`` payload (float64), if one was sent


def _global_moments(x: Tensor, pieces: int, k: int, passes, process_group, layer: str,
                    extra: Optional[Tensor] = None) -> _Moments:
    """All-gather every rank's per-segment (count, mean, M2) and merge them (Chan's parallel
    formula, in float64) over the ranks and over each run of ``k`` consecutive segments
    (segment s = c * pieces + p; BGN's groups of whole channels have k = C / G).

    Raises ValueError (on every rank alike, before any state changes) when a statistic
    covers fewer than 2 values across the group. Under torch.compile or CUDA graph capture
    that check runs on the device instead (``torch._assert_async``, a RuntimeError with the
    same message), so the step has no host synchronisation."""
    C = x.shape[1]
    local_count = x.numel() // (C * pieces)
    mean, m2 = passes.stats(x, pieces)
    parts = [mean.new_full((1,), local_count, dtype=torch.float64),
             mean.double().flatten(), m2.double().flatten()]
    if extra is not None:
        parts.append(extra.double().flatten())
    # Detached: the all-gather is differentiable, but the gradient through the statistics is
    # _SyncNormApply's (its own all-reduce); the functional collective is one dynamo traces.
    payload = torch.cat(parts).detach()
    table = _funcol().all_gather_tensor(payload.unsqueeze(0), 0, _group(process_group))  # (W, 1 + 2CP [+ extra])
    segs = C * pieces
    counts = table[:, 0].view(-1, 1, 1)
    means = table[:, 1:1 + segs].view(-1, segs // k, k)
    m2s = table[:, 1 + segs:1 + 2 * segs].view(-1, segs // k, k)
    total = table[:, 0].sum() * k  # exact: counts are integers far below 2**53
    message = (f"{layer}: expected more than 1 value per statistic when training, got fewer summed over "
               f"the processes of the group (local input of shape {tuple(x.shape)})")
    if not _host_may_sync(x):
        torch._assert_async(total >= 2, message)
    elif total < 2:  # one host sync, eager only: every rank raises before any state changes
        raise ValueError(message.replace("fewer", f"{int(total)}"))
    merged_mean = (counts * means).sum((0, 2)) / total
    merged_m2 = (m2s + counts * (means - merged_mean.view(1, -1, 1)) ** 2).sum((0, 2))
    extra_out = table[0, 1 + 2 * segs:] if extra is not None else None
    return _Moments(total, merged_mean, merged_m2 / total, extra_out)


# ------------------------------------------------------------------------------- apply + backward
def _grad_coefficients(invstd: Tensor, red: Tensor, sum_a: Tensor, sum_b: Tensor) -> Tuple[Tensor, Tensor]:
    """The backward's reduction-weight form (the op contract's norm_backward): with
    ``A = sum weight * dy`` and ``B = sum weight * dy * (x - center)`` over every value of a
    statistic (all ranks), ``dx = weight * invstd * dy + k_x (x - center) + k_0`` where
    ``k_x = -invstd^3 red B`` and ``k_0 = -invstd red A`` (``red = 0``: constant statistics)."""
    return -invstd ** 3 * red * sum_b, -invstd * red * sum_a


class _SyncNormApply(torch.autograd.Function):
    """``y = (x - center) * weight * invstd + bias`` per segment (``PASSES.apply``). The
    statistics are not differentiable (as the contract's statistics ops): their dependence on
    x is this backward's, through ``red``: the segment sums of the gradient are all-reduced
    over the group, summed per statistic (``k`` consecutive segments) and turned into
    ``k_x``, ``k_0`` by :func:`_grad_coefficients`."""

    @staticmethod
    def forward(ctx, x, weight, bias, center, invstd, red, k, process_group, passes):
        C, P = center.shape
        gamma = _per_channel(weight, C, center)
        beta = _per_channel(bias, C, center, fill=0.0)
        y = passes.apply(x, center, (gamma * invstd).contiguous(), beta.expand(C, P).contiguous())
        ctx.save_for_backward(x, weight, center, invstd, red)
        ctx.k, ctx.process_group, ctx.passes = k, process_group, passes
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, center, invstd, red = ctx.saved_tensors
        C, P = center.shape
        sum_dy, sum_dy_xc = ctx.passes.grad_sums(dy, x, center)   # local, (C, P)
        gamma = _per_channel(weight, C, center)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # A and B of the statistic each segment belongs to, over every rank.
            sums = torch.stack([gamma * sum_dy, gamma * sum_dy_xc]).double()
            sums = _funcol().all_reduce(sums, "sum", _group(ctx.process_group))
            sums = sums.view(2, -1, ctx.k).sum(2, keepdim=True).expand(2, -1, ctx.k).reshape(2, C, P)
            sums = sums.to(center.dtype)
            k_x, k_0 = _grad_coefficients(invstd, red, sums[0], sums[1])
            grad_x = ctx.passes.grad_apply(dy, x, center, (gamma * invstd).contiguous(), k_x, k_0)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (sum_dy_xc * invstd).sum(1).to(weight.dtype)   # local, as DDP expects
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy.sum(1).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def _per_channel(t: Optional[Tensor], C: int, like: Tensor, fill: float = 1.0) -> Tensor:
    """A (C,) parameter (or None: ``fill``) as a (C, 1) column in the tables' dtype."""
    if t is None:
        return like.new_full((C, 1), fill)
    return t.detach().to(like.dtype).view(C, 1)


def _normalize(x, weight, bias, center, var, red, eps, k, process_group, passes) -> Tensor:
    """Apply the per-segment tables (C, P) ``center``, ``var``, ``red`` to x."""
    return _SyncNormApply.apply(x, weight, bias, center.contiguous(), torch.rsqrt(var + eps).contiguous(),
                                red.contiguous(), k, process_group, passes)


# ------------------------------------------------------------------------------- the three layers
# The backends' layer functions (the Backend protocol of stochnorm_ext.backend) plus, as keywords, the
# backend module whose passes to use and the group. Training synchronises; eval never does
# (it is the backend's own function, no collective).

def stoch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
               running_var: Tensor, mask: Optional[Tensor], training: bool, momentum: Optional[float],
               eps: float, update_stats: bool = True, num_batches_tracked: Optional[Tensor] = None, *,
               impl, process_group=None) -> Tensor:
    """StochNorm with training statistics over the group; the group's first rank's ``mask``
    is used on every rank. See ``reference.stoch_norm`` for the math."""
    if not training:
        return impl.stoch_norm(x, weight, bias, running_mean, running_var, mask, False, momentum, eps, False)
    layer = "stoch_norm"
    _check_cumulative(momentum, num_batches_tracked, update_stats, layer)
    passes = _passes(impl)
    acc = accumulate_dtype(x)
    moments = _global_moments(x, 1, 1, passes, process_group, layer, extra=mask)
    mask = moments.extra.to(torch.bool)
    batch_mean, batch_var = moments.mean.to(acc), moments.var.to(acc)
    # The moving branch uses the running statistics as they were before this step.
    center = torch.where(mask, batch_mean, running_mean.detach().to(acc))
    var = torch.where(mask, batch_var, running_var.detach().to(acc))
    red = mask.to(acc) / moments.count  # moving-branch channels: constant statistics
    if update_stats:
        update_running_stats(running_mean, running_var, batch_mean, batch_var, moments.count, momentum,
                             num_batches_tracked)
    return _normalize(x, weight, bias, center.view(-1, 1), var.view(-1, 1), red.view(-1, 1), eps, 1,
                      process_group, passes)


def batch_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                     momentum: Optional[float], eps: float, update_stats: bool = True,
                     num_batches_tracked: Optional[Tensor] = None, *, impl, process_group=None) -> Tensor:
    """BGN with training group statistics over the group of processes. See
    ``reference.batch_group_norm``."""
    if not training:
        return impl.batch_group_norm(x, num_groups, weight, bias, running_mean, running_var, False,
                                     momentum, eps, False)
    layer = "batch_group_norm"
    _check_cumulative(momentum, num_batches_tracked, update_stats and running_mean is not None, layer)
    passes = _passes(impl)
    acc = accumulate_dtype(x)
    C = x.shape[1]
    pieces, k = grouping(C, num_groups)   # k: segments per group
    moments = _global_moments(x, pieces, k, passes, process_group, layer)
    mean, var = moments.mean.to(acc), moments.var.to(acc)
    if update_stats and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, moments.count, momentum, num_batches_tracked)

    def per_segment(t):  # (G,) -> (C, pieces)
        return t.repeat_interleave(k).view(C, pieces)
    red = torch.ones_like(mean) / moments.count
    return _normalize(x, weight, bias, per_segment(mean), per_segment(var), per_segment(red), eps, k,
                      process_group, passes)


def cross_iteration_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         past_mean: Tensor, past_var: Tensor, past_keep: Tensor, training: bool,
                         momentum: Optional[float], eps: float, update_stats: bool = True,
                         num_batches_tracked: Optional[Tensor] = None, *, impl, process_group=None
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """CBN with the current training statistics over the group (the compensated past ones
    are the same on every rank). Returns ``(y, mu_t, var_t)`` with the group's current
    statistics. See ``reference.cross_iteration_norm``."""
    if not training:
        return impl.cross_iteration_norm(x, weight, bias, running_mean, running_var, past_mean, past_var,
                                         past_keep, False, momentum, eps, False)
    layer = "cross_iteration_batch_norm"
    _check_cumulative(momentum, num_batches_tracked, update_stats and running_mean is not None, layer)
    passes = _passes(impl)
    acc = accumulate_dtype(x)
    moments = _global_moments(x, 1, 1, passes, process_group, layer)
    mu_t, var_t = moments.mean.to(acc), moments.var.to(acc)
    mu, var, count = pool_window(mu_t, var_t, past_mean, past_var, past_keep)
    red = 1.0 / (count * moments.count)
    if update_stats and running_mean is not None:
        update_running_stats(running_mean, running_var, mu_t, var_t, moments.count, momentum, num_batches_tracked)
    y = _normalize(x, weight, bias, mu.view(-1, 1), var.view(-1, 1), red.view(-1, 1), eps, 1,
                   process_group, passes)
    return y, mu_t, var_t


def _local_jacobians(conv_input: Tensor, conv_weight: Tensor, x: Tensor, mu_t: Tensor,
                     geometry: ConvGeometry) -> Tuple[Tensor, Tensor, int]:
    """This rank's Jacobians and its value count (zeros for an empty batch: its weight in the
    average is 0, and its closed form would divide by 0)."""
    N, C, H, W = x.shape
    local = N * H * W
    if local > 0:
        return (*_local_conv_jacobians(conv_input, conv_weight, x, mu_t, geometry), local)
    acc = accumulate_dtype(x)
    cin_g, kh, kw = conv_weight.shape[1:]
    return (conv_weight.new_zeros((geometry.groups, cin_g, kh, kw), dtype=acc),
            conv_weight.new_zeros((C, cin_g, kh, kw), dtype=acc), local)


def _start_average(dmu: Tensor, dvar: Tensor, local: int, process_group) -> Tensor:
    """Issue the all-reduce of the count-weighted Jacobians (float64). Eagerly the functional
    collective returns at once, its result an AsyncCollectiveTensor that waits on first use."""
    flat = torch.cat([dmu.double().flatten() * local, dvar.double().flatten() * local,
                      dmu.new_full((1,), local, dtype=torch.float64)])
    return _funcol().all_reduce(flat, "sum", _group(process_group))


def _finish_average(flat: Tensor, dmu: Tensor, dvar: Tensor) -> Tuple[Tensor, Tensor]:
    """The averaged Jacobians, shaped and typed like this rank's ``dmu``, ``dvar``."""
    if isinstance(flat, _funcol().AsyncCollectiveTensor):  # eager; under compile the graph waits
        flat = flat.wait()
    total = flat[-1]
    return ((flat[:dmu.numel()] / total).view(dmu.shape).to(dmu.dtype),
            (flat[dmu.numel():-1] / total).view(dvar.shape).to(dvar.dtype))


def conv_jacobians(conv_input: Tensor, conv_weight: Tensor, x: Tensor, mu_t: Tensor,
                   geometry: ConvGeometry, process_group) -> Tuple[Tensor, Tensor]:
    """CBN's Jacobians ``dmu``, ``dvar`` over the whole group: each rank's conv
    weight-gradients (centred on the group's ``mu_t``) averaged with the ranks' value counts
    by one all-reduce in float64, waited for here. A rank with an empty batch contributes
    nothing. (:func:`push_entry_deferred` overlaps that all-reduce with the rest of the step.)"""
    dmu, dvar, local = _local_jacobians(conv_input, conv_weight, x, mu_t, geometry)
    return _finish_average(_start_average(dmu, dvar, local, process_group), dmu, dvar)


class PendingEntry:
    """A window entry whose Jacobian average is still in flight (:func:`push_entry_deferred`).
    ``land()`` waits for the all-reduce and rewrites the entry's slot with the average, exactly
    what the synchronous path stores; a second call does nothing."""

    def __init__(self, window: CBNWindow, flat: Tensor, dmu: Tensor, dvar: Tensor, mu_t: Tensor,
                 var_t: Tensor, conv_weight: Tensor, burnin: int, store: Callable[..., None] = push_entry):
        self.flat, self.dmu, self.dvar = flat, dmu, dvar
        self.mu_t, self.var_t, self.burnin, self.store = mu_t, var_t, burnin, store
        # The step's slot and counter, and W(tau): the optimiser updates the conv's weight in
        # place before the entry lands, and <dmu, W(tau)> must use the weight of this step.
        self.window = window._replace(head=window.head.clone(), step=window.step.clone())
        self.weight = conv_weight.detach().clone()

    def land(self) -> None:
        if self.flat is None:
            return
        dmu, dvar = _finish_average(self.flat, self.dmu, self.dvar)
        self.flat = None
        # push_entry on a copy of head/step: it writes the recorded slot (if the burn-in was
        # over then) and advances only the copies.
        self.store(self.window, self.mu_t, self.var_t, dmu, dvar, self.weight, self.burnin)


def push_entry_deferred(window: CBNWindow, conv_input: Tensor, conv_weight: Tensor, x: Tensor,
                        mu_t: Tensor, var_t: Tensor, geometry: ConvGeometry, burnin: int,
                        process_group, store: Callable[..., None] = push_entry) -> PendingEntry:
    """Store this step's entry with the group-averaged Jacobians, the average landing later.

    The Jacobians are only needed by later steps, so their all-reduce overlaps the rest of the
    step: this issues it and stores the entry at once with this rank's own Jacobians (head and
    step advance, ``mean``/``var``/``valid`` are final); the returned entry's ``land()`` then
    rewrites the slot's Jacobians and their dot products with the average. The module calls
    ``land()`` before anything reads the window (its next forward, ``state_dict``,
    ``load_state_dict``, ``.to()``, pickling, rebinding); until then the slot's ``dmu``,
    ``dvar``, ``dmu_w`` and ``dvar_w`` buffers, read directly, hold this rank's values."""
    with torch.no_grad():
        dmu, dvar, local = _local_jacobians(conv_input, conv_weight, x, mu_t, geometry)
        flat = _start_average(dmu, dvar, local, process_group)
        pending = PendingEntry(window, flat, dmu, dvar, mu_t, var_t, conv_weight, burnin, store)
        store(window, mu_t, var_t, dmu, dvar, conv_weight, burnin)
    return pending
