"""StochNorm modules: a thin layer over :func:`stochnorm_ext.functional.stoch_norm`."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _checks
from ..backend import resolve
from ..functional import draw_mask, run_stoch_norm
from ._base import rank_variants, _in_backward_recompute, _may_be_recomputed, _NormBase

__all__ = ["StochNorm1d", "StochNorm2d", "StochNorm3d"]


class _StochNorm(_NormBase):
    """Stochastic Normalization (StochNorm, Kou et al., NeurIPS 2020).

    Two branches per channel in training: the batch branch normalises with this batch's
    statistics, the moving branch with the running statistics as they were before this
    step. One Bernoulli(``p``) draw per channel and forward call
    (``torch.empty(C, dtype=torch.bool).bernoulli_(p)``, one kernel, with the default
    PyTorch generator on the input's device, so ``torch.manual_seed``
    reproduces a run) picks the batch branch with probability ``p``. The running
    statistics are updated once per step from the batch statistics, whatever the mask.
    Eval is BatchNorm with the running statistics. ``p = 1`` is BatchNorm; ``p = 0``
    normalises every channel with the (pre-update) running statistics. The mask is drawn
    only after every argument is checked: like ``nn.BatchNorm*d`` (which draws nothing), a
    call that raises leaves the RNG as it was.

    Args:
        num_features: C, the channel count.
        eps: added to the variance inside the square root.
        momentum: running-statistics update factor, or None for a cumulative average.
        affine: learn per-channel ``weight`` and ``bias``.
        track_running_stats: must be True (the moving branch needs running statistics).
        p: probability of the batch branch, in [0, 1].
        backend: ``"reference" | "cpu" | "triton" | "cuda"`` or None for the best available.
        sync: take the training statistics over the processes of ``process_group`` (None:
            the default group), like ``nn.SyncBatchNorm``; every rank uses the first rank's mask.

    The state dict is that of ``nn.BatchNorm*d``: a pretrained BN loads directly.
    Differences from the published code: the mask is drawn on the input's device with the
    PyTorch generator (not NumPy on the host), each channel is normalised once (not both
    branches in full), the moving branch's gradient uses the pre-update running variance
    (exact), and 3d inputs work in training.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, p: float = 0.5,
                 backend: Optional[str] = None, sync: bool = False, process_group=None, *,
                 device=None, dtype=None, bias: bool = True):
        _checks.check_hyper("p", p, low=0.0, high=1.0)
        if not track_running_stats:
            raise ValueError("StochNorm needs running statistics: track_running_stats must be True")
        super().__init__(num_features, num_features, eps, momentum, affine, track_running_stats, backend,
                         sync, process_group, device, dtype, bias)
        self.p = float(p)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            y = self._eval_as_batch_norm(input)
            if y is not None:
                return y
        name = type(self).__name__
        recompute = self.training and _in_backward_recompute()
        w, b, rm, rv, count = self._tensors()
        if (self.training and not recompute and self._plain_call(input, rm, w) and 0.0 <= self.p <= 1.0
                and input.numel() >= 2 * self.num_features):
            # Nothing left to check: draw the mask and run the step on the backend.
            mask = draw_mask(self.num_features, self.p, input.device)
            if _may_be_recomputed():
                self._stash_step(mask)
            return resolve(self.backend, input.device).stoch_norm(
                input, w, b, rm, rv, mask, True, self.momentum, self.eps, True, count)
        if recompute:
            mask, moving_mean, moving_var = self._stash_take()
            return run_stoch_norm(input, moving_mean, moving_var, w, b, True, 0.0, self.eps, self.p, mask,
                               None, self.backend, False, self.sync, self.process_group, None, None, name,
                               self.num_features, self._allowed_dims)
        # The functional form checks everything once, then draws the mask: a call that raises
        # leaves the RNG as it was (like nn.BatchNorm, which draws nothing). It counts the step
        # in num_batches_tracked (an empty batch included, as nn.BatchNorm does).
        stash = self._stash_step if self.training and _may_be_recomputed() else None
        return run_stoch_norm(input, rm, rv, w, b, self.training, self.momentum, self.eps, self.p, None,
                           None, self.backend, True, self.sync, self.process_group, count, stash, name,
                           self.num_features, self._allowed_dims)

    def _stash_step(self, mask: Tensor) -> None:
        """What a recomputation under activation checkpointing reuses: the mask and the
        running statistics before this step's update (copied only under checkpointing)."""
        self._stash_put((mask, self.running_mean.clone(), self.running_var.clone()))


StochNorm1d, StochNorm2d, StochNorm3d = rank_variants(_StochNorm, "StochNorm")
