"""Synchronised statistics across processes (``torch.distributed``), like ``nn.SyncBatchNorm``.

With ``sync=True`` (a layer argument, a ``convert_model`` option, or :func:`convert_sync`)
a *training* forward takes its statistics over the union of the batches of every process
of ``process_group`` (None: the default group), so W processes with batches
``n_1 .. n_W`` compute what one process computes on the concatenated batch: outputs, input
gradients, running statistics and CBN windows. Batch sizes may differ between processes
(an empty batch included: that process still takes part in every collective); statistics
are merged with their counts, and fewer than 2 values per statistic over the whole group
raises ValueError on every process. Parameter gradients stay local sums, as with
``nn.SyncBatchNorm``: ``DistributedDataParallel`` averages them. Eval never syncs (no
collective runs in eval). Every process of the group must run the layer's training
forward (and backward) the same number of times, as with any collective.

torch.compile: synchronised layers compile with ``fullgraph=True`` (tested with the
``aot_eager`` backend). Every collective is a functional one
(``torch.distributed._functional_collectives``: ``all_gather_single``, ``all_reduce``),
which dynamo traces into the graph and which runs eagerly as an ordinary collective; the
all-reduce in the backward of the autograd.Function ``_SyncApply`` lands in the compiled
backward graph. The value count stays a tensor, so a compiled step has no host
synchronisation; the "fewer than 2 values" check is then ``torch._assert_async`` in the
graph: a RuntimeError (not ValueError) with the same message, raised on every rank when
the graph runs, before the graph's buffer updates are written back (so state is untouched
under ``aot_eager``; inductor gives no such ordering promise). Eager keeps the ValueError.

One implementation serves every backend. Per layer and step::

    forward   local per-segment (count, mean, M2)     backend kernel or plain PyTorch
              all_gather; Chan merge in float64        one collective
              per-layer coefficients                   tiny (C,) / (C, P) tables, PyTorch
              y = (x - center) * scale + shift         backend kernel or plain PyTorch
    backward  local per-segment sum(dy), sum(dy (x - center))
              all_reduce in float64                    one collective
              dx = k_dy dy + k_x (x - center) + k_0    backend kernel or plain PyTorch

"Backend kernel" means the ops ``torch.ops.stochnorm_ext.segment_stats / segment_apply /
segment_grad_sums / segment_grad_apply`` of the ``cpu`` (and ``cuda``) backend; the
``reference`` and ``triton`` backends take the plain-PyTorch passes (the Triton backend
exposes no per-segment entry points).

Layer specifics:

* StochNorm uses the mask of the group's first rank on every rank (it travels in the same
  all-gather as the statistics), so the ranks never disagree even when their random
  generators do.
* BGN merges the statistics of each group's segments (whole channels for ``G | C``,
  one spatial piece of a channel for ``G = m * C``).
* CBN syncs the current statistics (the compensated past ones are the same on every rank:
  same window, same weights) and averages the Jacobians ``dmu``/``dvar`` with count weights
  (:func:`conv_jacobians`), so every rank stores the same window entry. The Jacobians are
  only needed by later steps, so the module (eager) overlaps that all-reduce with the rest
  of the step (:func:`push_entry_deferred`): the entry lands before anything reads the
  window (the layer's next forward, ``state_dict()``, ``load_state_dict``, ``.to()``,
  pickling / deepcopy, ``bind``/``unbind``/``reset_window``); only the slot's Jacobian
  buffers, read directly in between, show this rank's own values. The functional form
  and compiled steps wait for it within the step.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._checks import accumulate_dtype, memory_format_of
from .cbn_window import ConvGeometry
from .cbn_window import CBNWindow, push_entry
from .cbn_window import conv_jacobians as _local_conv_jacobians
from .reference import pool_window, update_running_stats

__all__ = ["convert_sync", "check_ready", "stoch_norm", "batch_group_norm", "cross_iteration_norm",
           "conv_jacobians", "push_entry_deferred", "PendingEntry"]


def _funcol():
    """``torch.distributed._functional_collectives``, imported on first use: it imports
    torch._dynamo and Triton, which ``import stochnorm_ext`` must not pay for (over a second;
    and Triton must load after ``TRITON_INTERPRET`` is set, e.g. by the self-check)."""
    from torch.distributed import _functional_collectives
    return _functional_collectives


# ------------------------------------------------------------------------------- public helpers
def convert_sync(model: nn.Module, process_group: Optional["dist.ProcessGroup"] = None) -> nn.Module:
    """Turn on synchronised statistics for every StochNorm, BGN and CBN layer of ``model``
    (in place; returns ``model``), over ``process_group`` (None: the default group).

    The counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm`` for this package's layers;
    plain ``nn.BatchNorm*d`` layers are left alone (convert those with that function). To turn
    sync off again, set ``layer.sync = False`` on the layers.
    """
    from .nn import _NormBase
    for module in model.modules():
        if isinstance(module, _NormBase):
            module.sync = True
            module.process_group = process_group
    return model


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


# ------------------------------------------------------------------------------- the big passes
def _segments(x: Tensor, pieces: int) -> Tensor:
    """x (N, C, *S) in the accumulation dtype, viewed as (N, C, pieces, S / pieces)."""
    N, C = x.shape[:2]
    return x.to(accumulate_dtype(x)).reshape(N, C, pieces, math.prod(x.shape[2:]) // pieces)


def _table(t: Tensor) -> Tensor:
    """A (C, P) table broadcast over (N, C, P, L)."""
    return t.unsqueeze(0).unsqueeze(-1)


class _TorchPasses:
    """The four big passes in plain PyTorch (reference and triton backends, empty inputs)."""

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
        xs = _segments(x, center.shape[1])
        y = (xs - _table(center)) * _table(scale) + _table(shift)
        return y.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x))

    @staticmethod
    def grad_sums(dy: Tensor, x: Tensor, center: Tensor) -> Tuple[Tensor, Tensor]:
        pieces = center.shape[1]
        dys, xs = _segments(dy, pieces).to(center.dtype), _segments(x, pieces)
        return dys.sum((0, 3)), (dys * (xs - _table(center))).sum((0, 3))

    @staticmethod
    def grad_apply(dy, x, center, k_dy, k_x, k_0) -> Tensor:
        pieces = center.shape[1]
        dys, xs = _segments(dy, pieces).to(center.dtype), _segments(x, pieces)
        dx = _table(k_dy) * dys + _table(k_x) * (xs - _table(center)) + _table(k_0)
        return dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x))


class _KernelPasses:
    """The same passes on the backend's kernels, ``torch.ops.stochnorm_ext.segment_*``
    (tables in the accumulation dtype, statistics in float64; the ``.default`` overloads, as
    ``_ops.defaults`` calls them). Empty inputs go to the PyTorch passes."""

    @staticmethod
    def stats(x, pieces):
        if x.numel() == 0:
            return _TorchPasses.stats(x, pieces)
        return torch.ops.stochnorm_ext.segment_stats.default(x, pieces)

    @staticmethod
    def apply(x, center, scale, shift):
        if x.numel() == 0:
            return _TorchPasses.apply(x, center, scale, shift)
        return torch.ops.stochnorm_ext.segment_apply.default(x, center, scale, shift)

    @staticmethod
    def grad_sums(dy, x, center):
        if x.numel() == 0:
            return _TorchPasses.grad_sums(dy, x, center)
        return torch.ops.stochnorm_ext.segment_grad_sums.default(dy, x, center)

    @staticmethod
    def grad_apply(dy, x, center, k_dy, k_x, k_0):
        if x.numel() == 0:
            return _TorchPasses.grad_apply(dy, x, center, k_dy, k_x, k_0)
        return torch.ops.stochnorm_ext.segment_grad_apply.default(dy, x, center, k_dy, k_x, k_0)


def _passes(impl):
    """The backend's kernels when it runs on the ``segment_*`` ops (cpu, cuda), plain PyTorch
    otherwise. ``_backend.resolve`` picked ``impl`` for the input's device and only offers cpu / cuda
    where their kernels (the ``segment_*`` ones included) exist for that device."""
    name = getattr(impl, "__name__", "").rsplit(".", 1)[-1]
    return _KernelPasses if name in ("_backend_cpu", "_backend_cuda") else _TorchPasses


def _group(process_group):
    """The group the functional collectives run on (None: the default group)."""
    return dist.group.WORLD if process_group is None else process_group


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
    covers fewer than 2 values across the group. Under torch.compile that check runs in the
    graph instead (``torch._assert_async``, a RuntimeError with the same message when the
    graph runs), so the compiled step has no host synchronisation."""
    C = x.shape[1]
    local_count = x.numel() // (C * pieces)
    mean, m2 = passes.stats(x, pieces)
    parts = [mean.new_full((1,), local_count, dtype=torch.float64),
             mean.double().flatten(), m2.double().flatten()]
    if extra is not None:
        parts.append(extra.double().flatten())
    # Detached: the all-gather is differentiable, but the gradient through the statistics is
    # _SyncApply's (its own all-reduce); the functional collective is one dynamo traces.
    payload = torch.cat(parts).detach()
    table = _funcol().all_gather_single(payload.unsqueeze(0), 0, _group(process_group))  # (W, 1 + 2CP [+ extra])
    segs = C * pieces
    counts = table[:, 0].view(-1, 1, 1)
    means = table[:, 1:1 + segs].view(-1, segs // k, k)
    m2s = table[:, 1 + segs:1 + 2 * segs].view(-1, segs // k, k)
    total = table[:, 0].sum() * k  # exact: counts are integers far below 2**53
    message = (f"{layer}: expected more than 1 value per statistic when training, got fewer summed over "
               f"the processes of the group (local input of shape {tuple(x.shape)})")
    if torch.compiler.is_compiling():
        torch._assert_async(total >= 2, message)
    elif total < 2:  # one host sync, eager only: every rank raises before any state changes
        raise ValueError(message.replace("fewer", f"{int(total)}"))
    merged_mean = (counts * means).sum((0, 2)) / total
    merged_m2 = (m2s + counts * (means - merged_mean.view(1, -1, 1)) ** 2).sum((0, 2))
    extra_out = table[0, 1 + 2 * segs:] if extra is not None else None
    return _Moments(total, merged_mean, merged_m2 / total, extra_out)


# ------------------------------------------------------------------------------- apply + backward
class _SyncApply(torch.autograd.Function):
    """``y = (x - center) * weight * invstd + bias`` per segment, whose backward includes the
    path through the synchronised statistics: the segment sums of the gradient are
    all-reduced over the group and weighted by ``red`` (1 / values behind the statistic, or
    0 where the statistics are constants, e.g. StochNorm's moving branch)."""

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
            # Reductions of the statistic each segment belongs to, over every rank.
            sums = torch.stack([gamma * sum_dy, gamma * sum_dy_xc]).double()
            sums = _funcol().all_reduce(sums, "sum", _group(ctx.process_group))
            sums = sums.view(2, -1, ctx.k).sum(2, keepdim=True).expand(2, -1, ctx.k).reshape(2, C, P)
            sums = sums.to(center.dtype)
            k_x = -invstd ** 3 * sums[1] * red
            k_0 = -invstd * sums[0] * red
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


def _apply(x, weight, bias, center, invstd, red, k, process_group, passes) -> Tensor:
    return _SyncApply.apply(x, weight, bias, center.contiguous(), invstd.contiguous(),
                            red.contiguous(), k, process_group, passes)


# ------------------------------------------------------------------------------- the three layers
# Same arguments as the backends' functions (see _backend.py, training only) plus the group
# and the backend module whose kernels to use; the functional forms call them when sync=True.

def stoch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
               running_var: Tensor, mask: Tensor, momentum: float, eps: float, update_stats: bool,
               process_group, impl) -> Tensor:
    """Training StochNorm with statistics over the group; the group's first rank's ``mask``
    is used on every rank. See ``reference.stoch_norm`` for the math."""
    passes = _passes(impl)
    acc = accumulate_dtype(x)
    moments = _global_moments(x, 1, 1, passes, process_group, "stoch_norm", extra=mask)
    mask = moments.extra.to(torch.bool)
    batch_mean, batch_var = moments.mean.to(acc), moments.var.to(acc)
    # The moving branch uses the running statistics as they were before this step.
    center = torch.where(mask, batch_mean, running_mean.detach().to(acc))
    var = torch.where(mask, batch_var, running_var.detach().to(acc))
    red = mask.to(acc) / moments.count  # moving-branch channels: constant statistics
    invstd = torch.rsqrt(var + eps)
    if update_stats:
        update_running_stats(running_mean, running_var, batch_mean, batch_var, moments.count, momentum)
    return _apply(x, weight, bias, center.view(-1, 1), invstd.view(-1, 1), red.view(-1, 1), 1,
                  process_group, passes)


def batch_group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                     eps: float, update_stats: bool, process_group, impl) -> Tensor:
    """Training BGN with group statistics over the group of processes. See
    ``reference.batch_group_norm``."""
    passes = _passes(impl)
    acc = accumulate_dtype(x)
    C = x.shape[1]
    pieces = 1 if C % num_groups == 0 else num_groups // C
    k = C // num_groups if C % num_groups == 0 else 1     # segments per group
    moments = _global_moments(x, pieces, k, passes, process_group, "batch_group_norm")
    mean, var = moments.mean.to(acc), moments.var.to(acc)
    if update_stats and running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, moments.count, momentum)

    def per_segment(t):  # (G,) -> (C, pieces)
        return t.repeat_interleave(k).view(C, pieces)
    red = torch.ones_like(mean) / moments.count
    return _apply(x, weight, bias, per_segment(mean), per_segment(torch.rsqrt(var + eps)),
                  per_segment(red), k, process_group, passes)


def cross_iteration_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         past_mean: Tensor, past_var: Tensor, past_keep: Tensor, momentum: float,
                         eps: float, update_stats: bool, process_group, impl
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """Training CBN with the current statistics over the group (the compensated past ones
    are the same on every rank). Returns ``(y, mu_t, var_t)`` with the group's current
    statistics. See ``reference.cross_iteration_norm``."""
    passes = _passes(impl)
    acc = accumulate_dtype(x)
    moments = _global_moments(x, 1, 1, passes, process_group, "cross_iteration_batch_norm")
    mu_t, var_t = moments.mean.to(acc), moments.var.to(acc)
    mu, var, count = pool_window(mu_t, var_t, past_mean, past_var, past_keep)
    red = 1.0 / (count * moments.count)
    if update_stats and running_mean is not None:
        update_running_stats(running_mean, running_var, mu_t, var_t, moments.count, momentum)
    y = _apply(x, weight, bias, mu.view(-1, 1), torch.rsqrt(var + eps).view(-1, 1), red.view(-1, 1), 1,
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
                 var_t: Tensor, conv_weight: Tensor, burnin: int):
        self.flat, self.dmu, self.dvar = flat, dmu, dvar
        self.mu_t, self.var_t, self.burnin = mu_t, var_t, burnin
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
        push_entry(self.window, self.mu_t, self.var_t, dmu, dvar, self.weight, self.burnin)


def push_entry_deferred(window: CBNWindow, conv_input: Tensor, conv_weight: Tensor, x: Tensor,
                        mu_t: Tensor, var_t: Tensor, geometry: ConvGeometry, burnin: int,
                        process_group) -> PendingEntry:
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
        pending = PendingEntry(window, flat, dmu, dvar, mu_t, var_t, conv_weight, burnin)
        push_entry(window, mu_t, var_t, dmu, dvar, conv_weight, burnin)
    return pending
