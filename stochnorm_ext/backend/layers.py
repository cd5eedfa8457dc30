"""The three layers over a kernel provider's ops: one composition for every provider (the C++
ops of ``compiled``, the Triton ops of ``triton``), the op contract of docs/DESIGN.md.

Training is two ops: the layer's statistics op (batch statistics, coefficients, the running
statistics' update and the step count, in place; not differentiable) and ``norm_apply``
(differentiable in x, weight and bias; its backward, the one layer-agnostic ``norm_backward``,
carries the statistics' dependence on x through the per-statistic reduction weight ``red``).
Nothing after the statistics op can fail for input that ``stochnorm_ext.functional``
validated, so a failed call leaves the running statistics as they were without copying them.
Eval of StochNorm and CBN with running statistics is ``F.batch_norm``; of BGN one
``norm_apply`` with the running statistics as constant statistics.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

from .. import cbn_window
from .._rules import accumulate_dtype

__all__ = ["ProviderOps", "KernelLayers"]


class ProviderOps(NamedTuple):
    """A provider's ops, called with the contract's arguments. ``prepare(x)`` returns the
    input as the provider's kernels read it (e.g. made dense), once per call.
    ``detach_stats_input``: the statistics ops take x detached (ops whose autograd is
    Python's; C++ ones run below autograd and need no detached alias)."""
    stoch_norm_stats: Callable
    batch_group_norm_stats: Callable
    cross_iteration_norm_stats: Callable
    norm_apply: Callable
    prepare: Optional[Callable[[Tensor], Tensor]] = None
    detach_stats_input: bool = True
    # CBN's window steps as single ops (``cbn_window_compensate`` / ``cbn_window_store`` of
    # csrc/ops.cpp); None: the plain-PyTorch ones of ``stochnorm_ext.cbn_window``.
    window_compensate: Optional[Callable] = None
    window_store: Optional[Callable] = None


def batch_norm_eval(x, weight, bias, running_mean, running_var, eps) -> Tensor:
    """Eval of StochNorm / CBN: F.batch_norm with the running statistics. F.batch_norm takes
    parameters of x's dtype, or float32 ones with a half/bfloat16 x; other mixes (float32
    buffers with a float64 x, a half weight with float32 buffers) go in the accumulation dtype,
    as the reference computes them."""
    params = (running_mean, running_var, weight, bias)
    if any(t is not None and t.dtype != x.dtype for t in params):
        acc = accumulate_dtype(x)
        params = tuple(None if t is None else t.to(acc) for t in params)
    return F.batch_norm(x, params[0], params[1], params[2], params[3], False, 0.0, eps)


def _constant(t: Tensor, dtype) -> Tensor:
    """A running statistic as the constant statistics table of ``norm_apply``: in ``dtype``,
    outside autograd (the buffer itself when it already is: no op per call)."""
    return t if t.dtype is dtype and not t.requires_grad else t.detach().to(dtype)


def _float(momentum) -> Optional[float]:
    """The ops take ``float?``: an int momentum (0 or 1) as a float, None as None."""
    return None if momentum is None else float(momentum)


class KernelLayers:
    """The backend interface (``stochnorm_ext.backend.Backend``'s layer functions) over one
    provider's :class:`ProviderOps`."""

    def __init__(self, ops: ProviderOps):
        self.ops = ops

    def compensated_past(self, window, conv_weight: Tensor, rho: float, burnin: int):
        """``cbn_window.compensated_past``: one op when the provider has it."""
        if self.ops.window_compensate is None:
            return cbn_window.compensated_past(window, conv_weight, rho, burnin)
        w = window
        return self.ops.window_compensate(w.mean, w.var, w.dmu, w.dvar, w.dmu_w, w.dvar_w, w.valid, w.step,
                                          conv_weight.detach(), float(rho), burnin)

    def push_entry(self, window, mu_t: Tensor, var_t: Tensor, dmu: Tensor, dvar: Tensor, conv_weight: Tensor,
                   burnin: int, dots: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """``cbn_window.push_entry``: one op when the provider has it."""
        if self.ops.window_store is None:
            return cbn_window.push_entry(window, mu_t, var_t, dmu, dvar, conv_weight, burnin, dots)
        dots_mean, dots_var = (None, None) if dots is None else dots
        self.ops.window_store(*window, mu_t.detach(), var_t.detach(), dmu, dvar, conv_weight.detach(),
                              dots_mean, dots_var, burnin)

    def _prepare(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(x for norm_apply, x for the statistics op)."""
        if self.ops.prepare is not None:
            x = self.ops.prepare(x)
        return x, (x.detach() if self.ops.detach_stats_input else x)

    def stoch_norm(self, x, weight, bias, running_mean, running_var, mask, training, momentum, eps,
                   update_stats=True, num_batches_tracked=None) -> Tensor:
        """StochNorm: see ``reference.stoch_norm``. Batch-branch channels (``mask``) use this
        batch's statistics, the others the running statistics before this step's update."""
        x, x_stats = self._prepare(x)
        if not training:
            return batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
        center, var, red = self.ops.stoch_norm_stats(x_stats, running_mean, running_var, mask,
                                                     _float(momentum), num_batches_tracked, update_stats)
        return self.ops.norm_apply(x, weight, bias, center, var, red, x.shape[1], eps)

    def batch_group_norm(self, x, num_groups, weight, bias, running_mean, running_var, training,
                         momentum, eps, update_stats=True, num_batches_tracked=None) -> Tensor:
        """BGN: see ``reference.batch_group_norm``. Batch statistics in training and whenever
        there are no running statistics."""
        if not training and running_mean is not None:  # one apply with constant statistics
            x, _ = self._prepare(x)
            acc = accumulate_dtype(x)
            return self.ops.norm_apply(x, weight, bias, _constant(running_mean, acc),
                                       _constant(running_var, acc), None, num_groups, eps)
        x, x_stats = self._prepare(x)
        center, var, red = self.ops.batch_group_norm_stats(
            x_stats, num_groups, running_mean, running_var, _float(momentum), num_batches_tracked,
            training and update_stats)
        return self.ops.norm_apply(x, weight, bias, center, var, red, num_groups, eps)

    def cross_iteration_norm(self, x, weight, bias, running_mean, running_var, past_mean, past_var,
                             past_keep, training, momentum, eps, update_stats=True,
                             num_batches_tracked=None) -> Tuple[Tensor, Tensor, Tensor]:
        """The normalisation step of CBN: see ``reference.cross_iteration_norm``. Returns
        ``(y, mu_t, var_t)``, the current batch's statistics being what the window stores."""
        x, x_stats = self._prepare(x)
        if not training and running_mean is not None:
            y = batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
            return y, running_mean.detach(), running_var.detach()
        mu_t, var_t, center, var, red = self.ops.cross_iteration_norm_stats(
            x_stats, running_mean, running_var, past_mean, past_var, past_keep, _float(momentum),
            num_batches_tracked, training and update_stats)
        return self.ops.norm_apply(x, weight, bias, center, var, red, x.shape[1], eps), mu_t, var_t
