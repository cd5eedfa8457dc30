"""``nn.Module`` forms of the three layers (one file per layer; shared state handling in
``_base.py``).

State-dict keys follow ``nn.BatchNorm*d`` (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), so a pretrained BatchNorm state dict loads
directly into StochNorm and CBN. The layers do not subclass ``nn.BatchNorm*d`` on purpose:
code that looks for BatchNorm (``nn.SyncBatchNorm.convert_sync_batchnorm``, conv-BN
fusion) must not mistake them for it.

Under activation checkpointing (``torch.utils.checkpoint``) a training forward that is
recomputed during backward reuses what the original forward saw (StochNorm's mask and
pre-update running statistics, CBN's compensated window) and changes no state, so one
training forward stays one step. The layer keeps what its latest training forward saw, so
each checkpointed training forward must be followed by its own backward before the layer's
next training forward (the usual loop). A second recomputation of the same forward raises;
a recomputation of an *older* forward (two checkpointed forwards, then the first one's
backward) cannot be told apart and would use the newer forward's mask/window.

Constructors take what ``nn.BatchNorm*d``'s take: ``num_features, eps, momentum, affine,
track_running_stats`` positionally and ``device``, ``dtype`` and ``bias`` as keywords
(``bias=False`` with ``affine=True``: a scale without a shift). ``eps`` must be positive
(``nn.BatchNorm*d`` raises the same ``ValueError`` at its first training forward; ours at
construction).

Like ``nn.BatchNorm*d``: an empty training batch (``N == 0``) counts in
``num_batches_tracked`` and changes nothing else, and a call that raises changes nothing,
the RNG included (StochNorm draws its mask after every check).

Every layer takes ``sync=False, process_group=None``: with ``sync=True`` the training
statistics are taken over all processes of ``process_group`` (None: the default group),
like ``nn.SyncBatchNorm`` (see ``stochnorm_ext.distributed``; ``convert_sync`` turns it on
for a whole model). Eval never syncs.
"""
from ._base import _NormBase
from .batch_group_norm import BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d
from .cross_iteration import Conv2dCBN, CrossIterationBatchNorm2d
from .stoch_norm import StochNorm1d, StochNorm2d, StochNorm3d

__all__ = [
    "StochNorm1d", "StochNorm2d", "StochNorm3d",
    "BatchGroupNorm1d", "BatchGroupNorm2d", "BatchGroupNorm3d",
    "CrossIterationBatchNorm2d", "Conv2dCBN",
]

# The layer classes, for code that treats any of them alike (conversion, deployment, sync).
LAYER_TYPES = (StochNorm1d, StochNorm2d, StochNorm3d, BatchGroupNorm1d, BatchGroupNorm2d,
               BatchGroupNorm3d, CrossIterationBatchNorm2d)
