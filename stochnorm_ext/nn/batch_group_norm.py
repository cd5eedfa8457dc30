"""Batch Group Normalization modules: a thin layer over
:func:`stochnorm_ext.functional.batch_group_norm`."""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .. import _checks
from .._rules import grouping
from ..backend import resolve
from ..functional import run_batch_group_norm
from ._base import rank_variants, _in_backward_recompute, _NormBase

__all__ = ["BatchGroupNorm1d", "BatchGroupNorm2d", "BatchGroupNorm3d"]


class _BatchGroupNorm(_NormBase):
    """Batch Group Normalization (BGN, Zhou et al. 2020).

    Each sample is flattened in logical ``(C, *S)`` order (whatever the memory format) and
    cut into ``num_groups`` contiguous pieces; statistics are taken per group over the
    batch and the piece. ``num_groups`` must divide ``num_features`` (groups of whole
    channels) or be a multiple ``m * num_features`` (each channel split into ``m``
    contiguous pieces of its flattened spatial positions; the spatial size must then be a
    multiple of ``m``, checked per call: a 7x7 input cannot take ``G = 2C``).
    ``num_groups == num_features`` is BatchNorm; ``num_groups == 1`` uses one mean and
    variance for the whole batch.

    Args:
        num_features: C. num_groups: G (see above).
        eps, momentum, affine: as in ``nn.BatchNorm*d``.
        track_running_stats: keep ``(G,)`` running statistics, used in eval; without
            them eval uses batch statistics.
        backend: ``"reference" | "cpu" | "triton" | "cuda"`` or None.
        sync: take the training statistics over the processes of ``process_group`` (None:
            the default group), like ``nn.SyncBatchNorm``.

    Affine parameters are per channel ``(C,)``, running statistics per group ``(G,)``.
    With ``G > C`` the running statistics belong to spatial positions: eval at another
    resolution than training is meaningless. No official code was published; this follows
    the paper's description (reshape to ``N x G x (C*S/G)``, statistics over dims 0 and 2).
    """

    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: Optional[str] = None,
                 sync: bool = False, process_group=None, *, device=None, dtype=None, bias: bool = True):
        _checks.check_hyper("num_features", num_features, low=1, integer=True)
        _checks.check_num_groups(num_groups, num_features)
        super().__init__(num_features, num_groups, eps, momentum, affine, track_running_stats, backend,
                         sync, process_group, device, dtype, bias)
        self.num_groups = num_groups

    def _pieces_fit(self, input: Tensor) -> bool:
        """With G = m C, each channel's positions split into m equal pieces."""
        pieces = grouping(self.num_features, self.num_groups).pieces
        return pieces == 1 or math.prod(input.shape[2:]) % pieces == 0

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, " + super().extra_repr().split(", ", 1)[1]

    def forward(self, input: Tensor) -> Tensor:
        w, b, rm, rv, count = self._tensors()
        training = self.training
        # A recomputation under activation checkpointing changes no state (one step, once).
        update = not (training and _in_backward_recompute())
        # Values needed: eval with running statistics one; batch statistics two per group.
        needed = 1 if not training and rm is not None else 2 * self.num_groups
        if update and self._plain_call(input, rm, w) and self._pieces_fit(input) and input.numel() >= needed:
            # Nothing left to check (eval: one apply; training: statistics op, apply).
            return resolve(self.backend, input.device).batch_group_norm(
                input, self.num_groups, w, b, rm, rv, training, self.momentum, self.eps, True,
                count if training else None)
        return run_batch_group_norm(input, self.num_groups, rm, rv, w, b, training, self.momentum, self.eps,
                                 self.backend, update, self.sync, self.process_group, count,
                                 type(self).__name__, self.num_features, self._allowed_dims)


BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d = rank_variants(_BatchGroupNorm, "BatchGroupNorm")
