"""Cross-Iteration BatchNorm modules: ``CrossIterationBatchNorm2d`` (bound to the conv that
feeds it) and ``Conv2dCBN`` (a conv and its CBN in one module)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _checks
from ..cbn_window import CBNWindow, ConvGeometry
from ..functional import run_cross_iteration
from ._base import _in_backward_recompute, _NormBase, held

__all__ = ["CrossIterationBatchNorm2d", "Conv2dCBN"]


_WINDOW_FIELDS = ("mean", "var", "dmu", "dvar", "dmu_w", "dvar_w", "valid", "head")


def _conv_tensors(conv: nn.Conv2d):
    """The conv's weight and bias (read as the layer reads its own: :func:`._base.held`)."""
    p = conv._parameters
    return held(conv, p, "weight"), held(conv, p, "bias")


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
        """Store the entries still pending: a step's whose backward has not run yet
        (``cbn_window.StoreAtBackward``), a synchronised step's whose Jacobian average is in
        flight (``distributed.PendingEntry``). A no-op once they landed."""
        deferred = self.__dict__.get("_deferred")  # absent in modules pickled before it existed
        while deferred:
            deferred.pop(0).land()

    def __getattr__(self, name: str):
        # The window buffers and the step counter, read as attributes, show every step so far:
        # a pending entry lands first (nn.Module looks buffers up here, after the instance dict).
        if (name == "step" or name.startswith("window_")) and self.__dict__.get("_deferred"):
            self._land()
        return super().__getattr__(name)

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
        buffers = self._buffers
        return CBNWindow(*(buffers["window_" + f] for f in _WINDOW_FIELDS), step=buffers["step"])

    def forward(self, input: Tensor, conv_input: Optional[Tensor] = None) -> Tensor:
        """Normalise ``input``, the bound conv's output. ``conv_input`` overrides the input
        captured by the bound conv's hook (``Conv2dCBN`` passes it)."""
        self._land()
        if not self.training:
            y = self._eval_as_batch_norm(input)  # eval with running statistics is BatchNorm
            if y is not None:
                return y
        name = type(self).__name__
        use_window = self.training and self.window > 1
        # A recomputation (activation checkpointing) reuses the stashed window and stores
        # nothing, so it needs no conv input: the conv may have run outside.
        recompute = self.training and _in_backward_recompute()
        captured, self._captured = self._captured, None

        def conv_source() -> Tensor:
            """The conv's input; called by the functional form after the input checks."""
            if self._conv is None:
                raise RuntimeError(f"{name} with window={self.window} needs its conv in training: "
                                   "call bind(conv) (or use convert_model / Conv2dCBN)")
            if conv_input is not None:
                return conv_input
            if captured is None or captured[1] is not input:
                raise RuntimeError(
                    f"{name}: the bound conv did not produce this input in this forward "
                    f"(expected the conv's output itself, of shape {tuple(input.shape)}, not a "
                    "tensor computed from it or another one); the layer must directly follow "
                    "the conv it is bound to")
            return captured[0]

        window = self._window() if use_window and not recompute else None
        w, b, rm, rv, count = self._tensors()
        conv = self._conv
        conv_weight, conv_bias = _conv_tensors(conv) if conv is not None else (None, None)
        rho, burnin = self.rho, self.burnin
        # A plainly valid training call (the layer's tensors, its hyper-parameters, no sync;
        # more than one value per channel) skips the checks of the functional form.
        plain = (self.training and not recompute and self._plain_call(input, rm, w)
                 and input.numel() >= 2 * self.num_features and type(rho) is float and math.isfinite(rho)
                 and type(burnin) is int and burnin >= 0)
        # The functional form checks everything once (what is plain, skipped) and counts the step
        # in num_batches_tracked (an empty batch included, as nn.BatchNorm does; momentum=None
        # reads its factor there).
        return run_cross_iteration(input, None, conv_weight, self._geometry, window, w, b, rm, rv,
                                self.training, self.momentum, self.eps, rho, burnin, self.backend,
                                past=self._stash_take() if use_window and recompute else None,
                                update_state=not recompute, sync=self.sync,
                                process_group=self.process_group, num_batches_tracked=count,
                                deferred=self._deferred, layer=name, num_features=self.num_features,
                                conv_source=conv_source if use_window and not recompute else None,
                                on_past=self._stash_put, conv_bias=conv_bias, plain=plain)

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
