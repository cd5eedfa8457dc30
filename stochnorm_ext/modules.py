"""``nn.Module`` forms of the three layers.

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
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import _checks
from .cbn_window import CBNWindow, ConvGeometry, compensated_past
from .functional import _batch_group_norm, _cross_iteration, _stoch_norm

__all__ = [
    "StochNorm1d", "StochNorm2d", "StochNorm3d",
    "BatchGroupNorm1d", "BatchGroupNorm2d", "BatchGroupNorm3d",
    "CrossIterationBatchNorm2d", "Conv2dCBN",
]


def _may_be_recomputed() -> bool:
    """Whether this training forward may be recomputed during backward: it runs under
    activation checkpointing's saved-tensor hooks (non-reentrant) or without grad mode
    (reentrant checkpointing, or a no-grad step). Only then does StochNorm keep copies."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _in_backward_recompute() -> bool:
    """True while the autograd engine runs (a checkpointed forward being recomputed)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class _NormBase(nn.Module):
    """Parameters, buffers and state-dict behaviour shared with ``nn.BatchNorm*d``."""

    _version = 2
    _allowed_dims = (4,)
    _layer_name = "norm"

    def __init__(self, num_features: int, stats_size: int, eps: float, momentum: Optional[float],
                 affine: bool, track_running_stats: bool, backend: Optional[str],
                 sync: bool = False, process_group=None, device=None, dtype=None, bias: bool = True):
        super().__init__()
        _checks.check_hyper("num_features", num_features, low=1, integer=True)
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        if backend is not None:
            from ._backend import BACKEND_NAMES
            if backend not in BACKEND_NAMES:
                raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        self.sync = sync
        self.process_group = process_group
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        factory = dict(device=device, dtype=dtype)
        # bias=False (with affine=True): a scale without shift, as nn.BatchNorm*d(bias=False).
        for name, wanted in (("weight", affine), ("bias", affine and bias)):
            self.register_parameter(name, nn.Parameter(torch.empty(num_features, **factory)) if wanted else None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(stats_size, **factory))
            self.register_buffer("running_var", torch.ones(stats_size, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._stash = None
        self._stash_fresh = False
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        no_bias = self.affine and self.bias is None
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                + ("bias=False, " if no_bias else "")
                + f"track_running_stats={self.track_running_stats}" + (", sync=True" if self.sync else ""))

    def _check_input(self, x) -> None:
        name = type(self).__name__
        _checks.check_input(x, self.num_features, self._allowed_dims, name)
        for t in (self.weight, self.running_mean):
            if t is not None and t.device != x.device:
                raise RuntimeError(f"{name}: the input is on {x.device} but the layer's parameters "
                                   f"and buffers are on {t.device}")
        if self.sync and self.training:
            from .distributed import check_ready
            check_ready(self.process_group, name)

    def _momentum_factor(self, counted: bool) -> float:
        """BatchNorm's update factor for this step; ``counted``: the step will be counted in
        ``num_batches_tracked`` (by ``_count_step`` once the call has succeeded)."""
        if self.momentum is not None:
            return self.momentum
        if not (self.training and self.track_running_stats):
            return 0.0
        # Cumulative moving average over the steps counted so far, this one included.
        return 1.0 / max(float(self.num_batches_tracked) + (1 if counted else 0), 1.0)

    def _count_step(self) -> None:
        """Count a training step; called after the step succeeded, so a call that raised
        leaves num_batches_tracked as it was. Like ``nn.BatchNorm*d``, an empty batch
        (``N == 0``) is counted although it leaves the running statistics alone."""
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)

    # Activation checkpointing: the recomputed forward reuses what the original one saw.
    def _stash_put(self, value) -> None:
        if not torch.compiler.is_compiling():
            self._stash, self._stash_fresh = value, True

    def _stash_take(self):
        if not self._stash_fresh:
            raise RuntimeError(
                f"{type(self).__name__}: a training forward is being recomputed during backward "
                "(activation checkpointing), but this layer ran another training forward since, or "
                "its state was already consumed by an earlier recomputation. Run each checkpointed "
                "training forward's backward before the next forward of the layer.")
        self._stash_fresh = False
        return self._stash

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Like nn.BatchNorm: checkpoints from before num_batches_tracked existed still load.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --------------------------------------------------------------------------- StochNorm
class _StochNorm(_NormBase):
    """Stochastic Normalization (StochNorm, Kou et al., NeurIPS 2020).

    Two branches per channel in training: the batch branch normalises with this batch's
    statistics, the moving branch with the running statistics as they were before this
    step. One Bernoulli(``p``) draw per channel and forward call (``torch.rand(C) < p``
    with the default PyTorch generator on the input's device, so ``torch.manual_seed``
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
        name = type(self).__name__
        if self.training and _in_backward_recompute():
            mask, moving_mean, moving_var = self._stash_take()
            return _stoch_norm(input, moving_mean, moving_var, self.weight, self.bias, True, 0.0,
                               self.eps, self.p, mask, None, self.backend, False, self.sync,
                               self.process_group, None, None, name, self.num_features, self._allowed_dims)
        # The functional form checks everything once, then draws the mask: a call that raises
        # leaves the RNG as it was (like nn.BatchNorm, which draws nothing). It counts the step
        # in num_batches_tracked (an empty batch included, as nn.BatchNorm does).
        stash = self._stash_step if self.training and _may_be_recomputed() else None
        return _stoch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                           self.training, self.momentum, self.eps, self.p, None, None, self.backend,
                           True, self.sync, self.process_group, self.num_batches_tracked, stash, name,
                           self.num_features, self._allowed_dims)

    def _stash_step(self, mask: Tensor) -> None:
        """What a recomputation under activation checkpointing reuses: the mask and the
        running statistics before this step's update (copied only under checkpointing)."""
        self._stash_put((mask, self.running_mean.clone(), self.running_var.clone()))


class StochNorm1d(_StochNorm):
    __doc__ = _StochNorm.__doc__ + "\n    Input ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class StochNorm2d(_StochNorm):
    __doc__ = _StochNorm.__doc__ + "\n    Input ``(N, C, H, W)``, contiguous or channels_last.\n"
    _allowed_dims = (4,)


class StochNorm3d(_StochNorm):
    __doc__ = _StochNorm.__doc__ + "\n    Input ``(N, C, D, H, W)``, contiguous or channels_last_3d.\n"
    _allowed_dims = (5,)


# --------------------------------------------------------------------------- BGN
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

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, " + super().extra_repr().split(", ", 1)[1]

    def forward(self, input: Tensor) -> Tensor:
        # A recomputation under activation checkpointing changes no state (one step, once).
        update = not (self.training and _in_backward_recompute())
        return _batch_group_norm(input, self.num_groups, self.running_mean, self.running_var,
                                 self.weight, self.bias, self.training, self.momentum, self.eps,
                                 self.backend, update, self.sync, self.process_group,
                                 self.num_batches_tracked, type(self).__name__, self.num_features,
                                 self._allowed_dims)


class BatchGroupNorm1d(_BatchGroupNorm):
    __doc__ = _BatchGroupNorm.__doc__ + "\n    Input ``(N, C)`` or ``(N, C, L)``.\n"
    _allowed_dims = (2, 3)


class BatchGroupNorm2d(_BatchGroupNorm):
    __doc__ = _BatchGroupNorm.__doc__ + "\n    Input ``(N, C, H, W)``, contiguous or channels_last.\n"
    _allowed_dims = (4,)


class BatchGroupNorm3d(_BatchGroupNorm):
    __doc__ = _BatchGroupNorm.__doc__ + "\n    Input ``(N, C, D, H, W)``, contiguous or channels_last_3d.\n"
    _allowed_dims = (5,)


# --------------------------------------------------------------------------- CBN
_WINDOW_FIELDS = ("mean", "var", "dmu", "dvar", "dmu_w", "dvar_w", "valid", "head")


class _CaptureConvInput:
    """Forward hook on the bound conv: hands its input to the CBN layer in training.
    A class (not a closure) so that ``copy.deepcopy`` and pickling of the model keep the
    hook pointing at the copied layer."""

    def __init__(self, cbn: "CrossIterationBatchNorm2d"):
        self.cbn = cbn

    def __call__(self, conv, args, output):
        if self.cbn.training and self.cbn.window > 1:
            # The output itself (not its shape): the layer checks that it receives this very
            # tensor, so cbn(relu(conv(x))) cannot pass for the conv's output.
            self.cbn._captured = (args[0], output)


class CrossIterationBatchNorm2d(_NormBase):
    """Cross-Iteration Batch Normalization (CBN, Yao et al., CVPR 2021) for 2d inputs.

    Statistics are averaged over the current batch and the ``window - 1`` previous
    training steps, each compensated to the current weights of the conv that produces the
    input by a first-order Taylor step (scaled by ``rho``; ``rho = 0`` is plain averaging).
    A past entry whose compensated variance is negative is dropped for that channel. The
    first ``burnin`` training steps are plain BN and store nothing. Running statistics
    follow the current batch; eval is BatchNorm with the running statistics.
    ``window = 1`` is exactly BatchNorm (and needs no conv).

    The layer needs the input and weight of its conv: ``bind(conv)`` attaches the
    producing ``nn.Conv2d`` (any stride, padding, dilation, groups, padding mode) through a
    forward hook (in training the layer must receive the conv's output tensor itself:
    ``cbn(relu(conv(x)))`` raises) and creates the window buffers, so ``load_state_dict``
    of a CBN checkpoint works right after binding and resumes exactly. A plain BatchNorm state dict loads too
    (empty window). :class:`Conv2dCBN` bundles a conv and a CBN without hooks, and
    ``stochnorm_ext.convert_model(model, "cbn")`` binds every conv -> BN pair of a model.

    Args:
        num_features: C. window: k >= 1, steps averaged (current included).
        burnin: plain-BN training steps before the window is used and filled.
        rho: scale of the Taylor compensation. eps, momentum, affine, track_running_stats,
        backend: as for the other layers.
        sync: take the current statistics over the processes of ``process_group`` (None:
            the default group) and average the stored Jacobians over them.

    Buffers: those of ``nn.BatchNorm2d``, ``step`` (this layer's own step counter) and,
    once bound, ``window_*`` (see ``stochnorm_ext.cbn_window``). Differences from the
    published code: eps inside the square root (the paper's code adds it outside), a
    numerically stable variance, closed-form Jacobians (no autograd graph), and the
    window kept in buffers (the published code keeps Python lists that checkpoints lose).
    """

    _allowed_dims = (4,)

    def __init__(self, num_features: int, window: int = 4, burnin: int = 0, rho: float = 1.0,
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, backend: Optional[str] = None,
                 sync: bool = False, process_group=None, *, device=None, dtype=None, bias: bool = True):
        _checks.check_hyper("window", window, low=1, integer=True)
        _checks.check_hyper("burnin", burnin, low=0, integer=True)
        _checks.check_hyper("rho", rho)
        super().__init__(num_features, num_features, eps, momentum, affine, track_running_stats, backend,
                         sync, process_group, device, dtype, bias)
        self.window = window
        self.burnin = burnin
        self.rho = float(rho)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long, device=device))
        self.__dict__["_conv"] = None
        self._geometry = None
        self._hook = None
        self._captured = None
        # Window entries of synchronised steps whose Jacobian average is still in flight
        # (stochnorm_ext.distributed.push_entry_deferred); landed before the window is read.
        self._deferred = []

    def _land(self) -> None:
        """Finish the in-flight Jacobian averages (a no-op without sync)."""
        deferred = self.__dict__.get("_deferred")  # absent in modules pickled before it existed
        while deferred:
            deferred.pop(0).land()

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", window={self.window}, burnin={self.burnin}, rho={self.rho}"
                + (", bound" if self._conv is not None else ""))

    @property
    def bound_conv(self) -> Optional[nn.Conv2d]:
        return self._conv

    def bind(self, conv: nn.Conv2d, capture_input: bool = True) -> "CrossIterationBatchNorm2d":
        """Attach the ``nn.Conv2d`` whose output this layer normalises and create an empty
        window for it (rebinding empties the window). With ``capture_input`` a forward hook
        on the conv hands its input to this layer; without it the caller passes
        ``conv_input`` to ``forward``. Returns self."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"bind() expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.out_channels != self.num_features:
            raise ValueError(f"bind(): the conv has {conv.out_channels} output channels, "
                             f"the layer has {self.num_features} features")
        self.unbind()
        ref = self.running_mean if self.running_mean is not None else conv.weight
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        empty = CBNWindow.empty(self.window, self.num_features, conv.weight.shape, conv.groups,
                                device=conv.weight.device, dtype=dtype)
        for field in _WINDOW_FIELDS:
            self.register_buffer("window_" + field, getattr(empty, field))
        # Not a submodule (nn.Module.__setattr__ would register it): the conv belongs to
        # the model, not to this layer's state dict.
        self.__dict__["_conv"] = conv
        self._geometry = ConvGeometry.from_conv(conv)
        if capture_input:
            self._hook = conv.register_forward_hook(_CaptureConvInput(self))
        return self

    def unbind(self) -> None:
        """Detach from the conv and drop the window buffers."""
        self._land()
        if self._hook is not None:
            self._hook.remove()
        for field in _WINDOW_FIELDS:
            if "window_" + field in self._buffers:
                del self._buffers["window_" + field]
        self.__dict__["_conv"] = None
        self._geometry = self._hook = self._captured = None

    def reset_window(self) -> None:
        """Empty the window (keeps the binding, the step counter and running statistics)."""
        self._land()
        if self._conv is not None:
            self.window_valid.zero_()
            self.window_head.zero_()

    def _window(self) -> Optional[CBNWindow]:
        self._land()
        if self._conv is None:
            return None
        return CBNWindow(*(getattr(self, "window_" + f) for f in _WINDOW_FIELDS), step=self.step)

    def forward(self, input: Tensor, conv_input: Optional[Tensor] = None) -> Tensor:
        """Normalise ``input``, the bound conv's output. ``conv_input`` overrides the input
        captured by the bound conv's hook (``Conv2dCBN`` passes it)."""
        self._land()
        self._check_input(input)
        name = type(self).__name__
        use_window = self.training and self.window > 1
        recompute = self.training and _in_backward_recompute()
        if use_window:
            if self._conv is None:
                raise RuntimeError(f"{name} with window={self.window} needs its conv in training: "
                                   "call bind(conv) (or use convert_model / Conv2dCBN)")
            captured, self._captured = self._captured, None
            # A recomputation (activation checkpointing) reuses the stashed window and
            # stores nothing, so it needs no conv input: the conv may have run outside.
            if conv_input is None and not recompute:
                if captured is None or captured[1] is not input:
                    raise RuntimeError(
                        f"{name}: the bound conv did not produce this input in this forward "
                        f"(expected the conv's output itself, of shape {tuple(input.shape)}, not a "
                        "tensor computed from it or another one); the layer must directly follow "
                        "the conv it is bound to")
                conv_input = captured[0]
        # A synchronised step runs on every rank, an empty local batch included.
        nonempty = input.shape[0] > 0 or self.sync
        update = self.training and not recompute and nonempty
        past = None
        if use_window and nonempty:
            if recompute:
                past = self._stash_take()
            else:
                if not self.sync:  # with sync, the count over the whole group is checked
                    _checks.check_values_per_statistic(input.numel() // input.shape[1], input, name)
                past = compensated_past(self._window(), self._conv.weight, self.rho, self.burnin)
                self._stash_put(past)
        conv_weight = self._conv.weight if self._conv is not None else None
        y = _cross_iteration(input, conv_input, conv_weight, self._geometry,
                             self._window() if use_window and not recompute else None,
                             self.weight, self.bias,
                             self.running_mean, self.running_var, self.training,
                             self._momentum_factor(update), self.eps, self.rho, self.burnin,
                             self.backend, past, update_state=update, sync=self.sync,
                             process_group=self.process_group, deferred=self._deferred)
        if self.training and not recompute:  # an empty batch counts, as in nn.BatchNorm
            self._count_step()
        return y

    def _apply(self, fn, recurse=True):
        # <dmu, W(tau)> and <dvar, W(tau)> stay float64 whatever .half()/.float()/.to(dtype)
        # does to the other buffers: their differences with <., W(t)> need the precision.
        self._land()
        exact = {k: self._buffers.pop(k) for k in ("window_dmu_w", "window_dvar_w") if k in self._buffers}
        super()._apply(fn, recurse)
        for key, t in exact.items():
            self._buffers[key] = t.to(device=self.window_mean.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._land()
        has_window = [k for k in state_dict if k.startswith(prefix + "window_")
                      and "." not in k[len(prefix):]]
        if has_window and self._conv is None:
            error_msgs.append(f"{type(self).__name__}: the state dict holds a CBN window "
                              f"({prefix}window_*): call bind(conv) before load_state_dict")
            return
        if not has_window and self._conv is not None:
            # A plain BatchNorm state dict (or one saved before binding): empty window.
            self.reset_window()
            for field in _WINDOW_FIELDS:
                state_dict[prefix + "window_" + field] = getattr(self, "window_" + field).clone()
        if prefix + "step" not in state_dict:
            state_dict[prefix + "step"] = torch.tensor(0, dtype=torch.long)  # CBN's own counter
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._land()  # a checkpoint holds the last step's entry
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __getstate__(self):
        self._land()
        state = super().__getstate__()
        state = dict(state)
        state["_captured"] = None  # never pickle an activation
        state["_deferred"] = []
        return state


class Conv2dCBN(nn.Module):
    """An ``nn.Conv2d`` followed by a :class:`CrossIterationBatchNorm2d` that reads the
    conv's input and weight directly (no forward hook). ``conv`` and ``norm`` are its
    submodules; the constructor takes the arguments of ``nn.Conv2d`` and, as ``cbn_kwargs``,
    those of the CBN layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 device=None, dtype=None, **cbn_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias, padding_mode, device=device, dtype=dtype)
        self.norm = CrossIterationBatchNorm2d(out_channels, device=device, dtype=dtype, **cbn_kwargs)
        self.norm.bind(self.conv, capture_input=False)  # forward passes the input explicitly

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x), conv_input=x)
