"""Differentiable functional forms of the three layers.

Each function validates its arguments (before anything is modified, so a call that
raises leaves running statistics and window state untouched), picks a backend
(``backend=None``: the best available for the input's device; see
``stochnorm_ext.backends()``) and runs it. Like ``torch.nn.functional.batch_norm``,
``momentum`` is the update factor itself; ``momentum=None`` (a cumulative average, as the
modules' ``momentum=None``) takes ``1 / num_batches_tracked`` from the step-count tensor
``num_batches_tracked``, which a training call increments.

Outputs keep the input's dtype and memory format; statistics accumulate in float32
(float64 for float64 input); parameters and running buffers may be float32 while the
input is float16/bfloat16 (autocast).

Inside ``torch.func`` transforms (grad, vjp, jacrev, vmap, ...) every backend computes with
the reference's plain PyTorch ops, which the transforms support; under vmap, training that
would update unbatched running statistics from a batched input raises, as for
``F.batch_norm``.

``run_stoch_norm``, ``run_batch_group_norm`` and ``run_cross_iteration`` are the whole calls
behind the public forms, with what the modules pass besides (their name for messages, their
channel count and input ranks, so the input is checked once; the hooks of activation
checkpointing); they are not part of the public API.

``sync=True`` takes the training statistics over every process of ``process_group``
(None: the default ``torch.distributed`` group), see ``stochnorm_ext.distributed``; it
needs an initialised process group in training and is ignored in eval.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _checks, distributed
from ._rules import accumulate_dtype
from .reference import affine, finish
from .backend import resolve, resolve_for_call
from .cbn_window import CBNWindow, ConvGeometry, StoreAtBackward, conv_jacobians

__all__ = ["stoch_norm", "batch_group_norm", "cross_iteration_batch_norm", "draw_mask"]

_IntPair = Union[int, Tuple[int, int]]


def _common_checks(layer, x, weight, bias, running_mean, running_var, stats_shape, momentum, eps,
                   training, num_batches_tracked=None):
    """The arguments every layer shares, checked once per call before anything changes."""
    C = x.shape[1]
    _checks.check_param(weight, "weight", (C,), x, layer)
    _checks.check_param(bias, "bias", (C,), x, layer)
    _checks.check_param(running_mean, "running_mean", stats_shape, x, layer)
    _checks.check_param(running_var, "running_var", stats_shape, x, layer)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{layer}: running_mean and running_var must both be given or both be None")
    _checks.check_counter(num_batches_tracked, x, layer)
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            raise ValueError(f"{layer}: momentum=None (a cumulative average) needs num_batches_tracked")
    else:
        _checks.check_hyper("momentum", momentum, low=0.0, high=1.0)
    _checks.check_eps(eps, training)


def _empty_step(x, weight, bias, training, update_stats, num_batches_tracked) -> Tensor:
    """N == 0 (not synchronised): nothing to normalise, an empty output still connected to the
    graph of x, weight and bias; a training step still counts in ``num_batches_tracked``, as
    in nn.BatchNorm*d."""
    if training and update_stats and num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    return finish(affine(x.to(accumulate_dtype(x)), weight, bias), x)


def _syncing(sync: bool, process_group, training: bool, layer: str) -> bool:
    """Whether this call synchronises its statistics (training with ``sync=True`` only);
    raises before anything changes when it should but cannot."""
    if not isinstance(sync, bool):
        raise TypeError(f"{layer}: sync must be a bool, got {type(sync).__name__}")
    if not (sync and training):
        return False
    distributed.check_ready(process_group, layer)
    return True


def _route(layer, backend, x, running_mean, running_var, training, update, sync, process_group,
           num_stats):
    """The last checks of a call, which need its backend and whether it synchronises, and
    those two: a statistic taken from this batch needs more than 1 value (with sync the
    count over the whole group is checked, by the distributed path)."""
    impl = resolve_for_call(backend, x, running_mean, running_var, training and update, layer)
    syncing = _syncing(sync, process_group, training, layer)
    if x.shape[0] > 0 and (training or running_mean is None) and not syncing:
        _checks.check_values_per_statistic(x.numel() // num_stats, x, layer)
    return impl, syncing


def draw_mask(num_features: int, p: float, device=None, generator: Optional[torch.Generator] = None
              ) -> Tensor:
    """StochNorm's per-channel branch choice: one Bernoulli(``p``) draw per channel,
    ``torch.empty(C, dtype=torch.bool).bernoulli_(p)`` with the PyTorch generator (the
    default one, or ``generator``) on ``device``; True selects the batch branch."""
    _checks.check_hyper("p", p, low=0.0, high=1.0)
    return _draw_mask(num_features, p, device, generator)


def _draw_mask(num_features: int, p: float, device, generator) -> Tensor:
    if p >= 1.0:
        return torch.ones(num_features, dtype=torch.bool, device=device)
    if p <= 0.0:
        return torch.zeros(num_features, dtype=torch.bool, device=device)
    # One kernel (rand then compare would be two); graph-safe like every torch draw.
    return torch.empty(num_features, dtype=torch.bool, device=device).bernoulli_(p, generator=generator)


def stoch_norm(
    input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, training: bool = False, momentum: Optional[float] = 0.1,
    eps: float = 1e-5, p: float = 0.5, mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None, backend: Optional[str] = None, sync: bool = False,
    process_group=None, num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Stochastic Normalization (StochNorm, Kou et al. 2020) of ``input`` ``(N, C, *S)``.

    Training: one Bernoulli(``p``) draw per channel (``mask``, drawn with ``generator`` if
    not given; True = batch branch) picks, for every sample and position of the channel,
    either this batch's statistics or the running statistics as they were before this
    step; ``y = weight * (x - mean) / sqrt(var + eps) + bias``. The running statistics are
    then updated in place from the batch statistics, whatever the mask. Eval: BatchNorm
    with the running statistics. ``p = 1`` is exactly ``F.batch_norm`` in training.

    ``num_batches_tracked`` (a 0-dim integer tensor, optional) counts training steps, as the
    modules' buffer does: a training call adds 1 to it, and ``momentum=None`` then uses the
    cumulative factor ``1 / num_batches_tracked`` read from the tensor (no host
    synchronisation, so a CUDA graph replays it).

    Unlike the published code, both branches are never computed (each channel is
    normalised once), the mask is a tensor drawn with the PyTorch generator on the input's
    device, and the moving branch's gradient uses the pre-update running variance.

    ``sync=True``: batch statistics over the processes of ``process_group`` in training,
    with the mask of the group's first rank on every rank.
    """
    return run_stoch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       p, mask, generator, backend, True, sync, process_group, num_batches_tracked)


def run_stoch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, p, mask,
                generator, backend, update_stats, sync=False, process_group=None,
                num_batches_tracked=None, on_mask=None, layer="stoch_norm", num_features=None,
                dims=(2, 3, 4, 5)):
    """The whole StochNorm call: every check once, then the backend. ``on_mask`` is called
    with the mask drawn here (after every check, so a call that raises draws nothing and
    leaves the RNG alone), before anything is computed or updated. The modules pass their
    name, channel count and allowed ranks, so that the input is checked once."""
    _checks.check_input(x, num_features, dims, layer)
    C = x.shape[1]
    if running_mean is None or running_var is None:
        raise ValueError(f"{layer}: StochNorm needs running statistics (running_mean and running_var)")
    _common_checks(layer, x, weight, bias, running_mean, running_var, (C,), momentum, eps, training,
                   num_batches_tracked)
    _checks.check_hyper("p", p, low=0.0, high=1.0)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (C,):
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{layer}: mask must be a bool tensor of shape ({C},), got {got}")
        if mask.device != x.device:
            raise RuntimeError(f"{layer}: mask is on {mask.device} but the input is on {x.device}")
    impl, syncing = _route(layer, backend, x, running_mean, running_var, training, update_stats, sync,
                           process_group, C)
    if x.shape[0] == 0 and not syncing:
        return _empty_step(x, weight, bias, training, update_stats, num_batches_tracked)
    if training:
        if mask is None:
            mask = _draw_mask(C, p, x.device, generator)
            if on_mask is not None:
                on_mask(mask)
    counter = num_batches_tracked if training and update_stats else None
    if syncing:
        return distributed.stoch_norm(x, weight, bias, running_mean, running_var, mask, training, momentum,
                                      eps, update_stats, counter, impl=impl, process_group=process_group)
    return impl.stoch_norm(x, weight, bias, running_mean, running_var, mask, training, momentum,
                           eps, update_stats, counter)


def batch_group_norm(
    input: Tensor, num_groups: int, running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, training: bool = False, momentum: Optional[float] = 0.1,
    eps: float = 1e-5, backend: Optional[str] = None, sync: bool = False, process_group=None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Batch Group Normalization (BGN, Zhou et al. 2020) of ``input`` ``(N, C, *S)``.

    Each sample is flattened in logical ``(C, *S)`` order and cut into ``num_groups``
    contiguous pieces; mean and (biased) variance are taken per group over the batch and
    the piece (``M = N * C * S / G`` values). ``G`` must divide ``C`` (groups of whole
    channels) or be a multiple ``m * C`` (each channel split into ``m`` contiguous pieces
    of its flattened spatial positions; ``S % m == 0``, checked per call). Affine
    parameters are per channel ``(C,)``; running statistics per group ``(G,)``, used in
    eval when given (batch statistics otherwise). ``G == C`` is exactly BatchNorm.
    ``num_batches_tracked``: as in :func:`stoch_norm`.
    ``sync=True``: training statistics over the processes of ``process_group`` (eval uses
    the local batch when there are no running statistics, never a collective).
    """
    return run_batch_group_norm(input, num_groups, running_mean, running_var, weight, bias, training,
                             momentum, eps, backend, True, sync, process_group, num_batches_tracked)


def run_batch_group_norm(x, num_groups, running_mean, running_var, weight, bias, training, momentum,
                      eps, backend, update_stats, sync=False, process_group=None,
                      num_batches_tracked=None, layer="batch_group_norm", num_features=None,
                      dims=(2, 3, 4, 5)):
    _checks.check_input(x, num_features, dims, layer)
    _checks.check_hyper("num_groups", num_groups, low=1, integer=True)
    _common_checks(layer, x, weight, bias, running_mean, running_var, (num_groups,), momentum, eps,
                   training, num_batches_tracked)
    _checks.check_groups_fit(num_groups, x, layer)
    impl, syncing = _route(layer, backend, x, running_mean, running_var, training, update_stats, sync,
                           process_group, num_groups)
    if x.shape[0] == 0 and not syncing:
        return _empty_step(x, weight, bias, training, update_stats, num_batches_tracked)
    counter = num_batches_tracked if training and update_stats else None
    if syncing:
        return distributed.batch_group_norm(x, num_groups, weight, bias, running_mean, running_var, training,
                                            momentum, eps, update_stats, counter, impl=impl,
                                            process_group=process_group)
    return impl.batch_group_norm(x, num_groups, weight, bias, running_mean, running_var, training,
                                 momentum, eps, update_stats, counter)


def _pair(v, name) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def cross_iteration_batch_norm(
    input: Tensor, conv_input: Optional[Tensor] = None, conv_weight: Optional[Tensor] = None,
    window: Optional[CBNWindow] = None, weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, running_mean: Optional[Tensor] = None,
    running_var: Optional[Tensor] = None, training: bool = False, momentum: Optional[float] = 0.1,
    eps: float = 1e-5, rho: float = 1.0, burnin: int = 0, stride: _IntPair = 1,
    padding: _IntPair = 0, dilation: _IntPair = 1, groups: int = 1,
    backend: Optional[str] = None, sync: bool = False, process_group=None,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Cross-Iteration Batch Normalization (CBN, Yao et al. 2021) of ``input`` ``(N, C, H, W)``,
    the output of ``conv2d(conv_input, conv_weight, stride, padding, dilation, groups)``.

    Training: the statistics are averaged over this batch and the steps stored in
    ``window`` (a :class:`CBNWindow`, updated in place), each compensated to the current
    ``conv_weight`` by a first-order Taylor step (``rho`` scales it; ``rho = 0`` is plain
    averaging). The first ``burnin`` steps counted by ``window.step`` are plain BN and
    store nothing; afterwards each step stores its statistics and Jacobians. The running
    statistics follow the current batch only. Eval: BatchNorm with the running statistics.
    ``window=None`` (or a window of 1) is exactly BatchNorm and needs no conv arguments.
    ``num_batches_tracked``: as in :func:`stoch_norm`.

    Differences from the published code: eps inside the square root (window 1 is exactly
    BN), a numerically stable variance, closed-form Jacobians, and the window kept in
    tensors that a checkpoint saves. Gradients treat the compensated past statistics as
    constants, as the published code does.

    ``sync=True``: the current statistics over the processes of ``process_group`` in
    training, and the stored Jacobians averaged over them (every rank stores the same entry).

    The window's tensors must be on the input's device (a ``RuntimeError`` names the field
    otherwise); its statistics may be float32 or float64 whatever the input's dtype.
    """
    geometry = ConvGeometry(_pair(stride, "stride"), _pair(padding, "padding"),
                            _pair(dilation, "dilation"), groups)
    return run_cross_iteration(input, conv_input, conv_weight, geometry, window, weight, bias,
                            running_mean, running_var, training, momentum, eps, rho, burnin,
                            backend, sync=sync, process_group=process_group,
                            num_batches_tracked=num_batches_tracked)


def _backward_will_store(x: Tensor) -> bool:
    """Whether a module's CBN step stores its window entry when the backward reaches ``x``
    (``cbn_window.StoreAtBackward``) rather than in the forward: eager, outside torch.func
    transforms, with a backward that can come (grad mode on, ``x`` requires grad), and
    without saved-tensor hooks (activation checkpointing, offloading), under which the
    entry is stored in the forward as before (a recomputation stores nothing)."""
    return (x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and torch._C._functorch.maybe_current_level() is None
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def run_cross_iteration(x, conv_input, conv_weight, geometry, window, weight, bias, running_mean,
                     running_var, training, momentum, eps, rho, burnin, backend, past=None,
                     update_state=True, sync=False, process_group=None, num_batches_tracked=None,
                     deferred=None, layer="cross_iteration_batch_norm", num_features=None,
                     conv_source=None, on_past=None, conv_bias=None, plain=False):
    """The whole CBN step: every check once, then the backend and the window's store.

    The module passes its name and channel count (the input is checked here, once), and:
    ``past`` (the compensated entries it stashed) when it recomputes a step under activation
    checkpointing, with ``update_state=False`` (running statistics, step counts and window
    untouched); ``conv_source`` (called in training after the input checks, before the window's and the
    conv's: it returns the conv input captured by the bound conv's hook, or raises); ``on_past`` (called with the
    compensated entries, to stash them for a recomputation); ``deferred`` (a list, the
    module's, which lands its entries before the window is read): a synchronised eager step
    appends its pending entry there (``distributed.push_entry_deferred``) to overlap its
    Jacobian all-reduce with the rest of the step; an unsynchronised one whose backward will
    come, the entry that its backward stores (``cbn_window.StoreAtBackward``). Without it
    (the public functional form) the entry is stored here. ``conv_bias``: the conv's bias
    (or None), which that later store may need. ``plain``: the module found the call plainly
    valid (``_NormBase._plain_call``, rho and burnin in range, more than one value per
    channel): the checks of the input, the layer's tensors and hyper-parameters and the
    backend's are skipped; the window's and the conv's are not."""
    C = x.shape[1]
    if plain:
        impl, syncing = resolve(backend, x.device), False
    else:
        _checks.check_input(x, num_features, (4,), layer)
        _common_checks(layer, x, weight, bias, running_mean, running_var, (C,), momentum, eps, training,
                       num_batches_tracked)
        _checks.check_hyper("rho", rho)
        _checks.check_hyper("burnin", burnin, low=0, integer=True)
    if window is not None and not isinstance(window, CBNWindow):
        raise TypeError(f"{layer}: window must be a CBNWindow or None, got {type(window).__name__}")
    if training and conv_source is not None:
        conv_input = conv_source()
    use_window = training and window is not None and window.slots > 0
    if window is not None:
        _checks.check_window(layer, x, window)
    if use_window:
        _checks.check_conv(layer, x, conv_input, conv_weight, geometry, window)
    if not plain:
        impl, syncing = _route(layer, backend, x, running_mean, running_var, training, update_state, sync,
                               process_group, C)
    if x.shape[0] == 0 and not syncing:
        return _empty_step(x, weight, bias, training, update_state, num_batches_tracked)
    if use_window and past is None:
        past = impl.compensated_past(window, conv_weight, rho, burnin)
        if on_past is not None:
            on_past(past)
    if past is None:
        empty = x.new_zeros(0, C, dtype=accumulate_dtype(x))
        past = (empty, empty, empty.to(torch.bool))
    counter = num_batches_tracked if training and update_state else None
    if syncing:
        y, mu_t, var_t = distributed.cross_iteration_norm(x, weight, bias, running_mean, running_var,
                                                          *past, training, momentum, eps, update_state,
                                                          counter, impl=impl, process_group=process_group)
    else:
        y, mu_t, var_t = impl.cross_iteration_norm(x, weight, bias, running_mean, running_var, *past,
                                                   training, momentum, eps, update_state, counter)
    if use_window and update_state:
        if syncing and deferred is not None and not torch.compiler.is_compiling():
            deferred.append(distributed.push_entry_deferred(window, conv_input, conv_weight, x, mu_t, var_t,
                                                            geometry, burnin, process_group, impl.push_entry))
            return y
        if not syncing and deferred is not None and _backward_will_store(x):
            entry = StoreAtBackward(window, conv_input, conv_weight, x, mu_t, var_t, geometry, burnin,
                                    conv_bias, impl.push_entry)
            x.register_hook(entry.hook)
            deferred.append(entry)
            return y
        if syncing:  # the Jacobians averaged over the group: every rank stores the same entry
            dmu, dvar = distributed.conv_jacobians(conv_input, conv_weight, x, mu_t, geometry,
                                                   process_group)
        else:
            dmu, dvar = conv_jacobians(conv_input, conv_weight, x, mu_t, geometry, mu_is_batch_mean=True)
        impl.push_entry(window, mu_t, var_t, dmu, dvar, conv_weight, burnin)
    elif training and update_state and window is not None:
        window.step.add_(1)
    return y
