"""What the three layers share with ``nn.BatchNorm*d``: parameters, buffers, state-dict
behaviour, and the bookkeeping of activation checkpointing (a training forward that is
recomputed during backward reuses what the original forward saw and changes no state)."""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from ..backend import BACKEND_NAMES, env_backend, load as load_backend


def _may_be_recomputed() -> bool:
    """Whether this training forward may be recomputed during backward: it runs under
    activation checkpointing's saved-tensor hooks (non-reentrant) or without grad mode
    (reentrant checkpointing, or a no-grad step). Only then does StochNorm keep copies."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def held(module: nn.Module, store: dict, name: str):
    """``module.<name>``, read from the module's parameter or buffer dict ``store``: a read
    through ``Module.__getattr__`` costs about 1.3 us on a CPU, a sizable part of a small
    call's budget. A parametrized one (``torch.nn.utils.parametrize``) is not in the dict and
    is read through its property, as an attribute read would."""
    return store[name] if name in store else getattr(module, name)


# Backends whose eval of StochNorm and CBN is F.batch_norm itself and of BGN one apply (the
# reference computes the same maps with its own rounding); None: the default choice.
_COMPILED_BACKENDS = (None, "cpu", "cuda", "triton")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _in_backward_recompute() -> bool:
    """True while the autograd engine runs (a checkpointed forward being recomputed)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


# What the 1d / 2d / 3d variant of a layer takes (the variants differ only in this).
_INPUTS = {
    1: ((2, 3), "Input ``(N, C)`` or ``(N, C, L)``."),
    2: ((4,), "Input ``(N, C, H, W)``, contiguous or channels_last."),
    3: ((5,), "Input ``(N, C, D, H, W)``, contiguous or channels_last_3d."),
}


def rank_variants(layer: type, name: str):
    """The 1d, 2d and 3d classes of ``layer`` (``name`` + ``1d`` ...), which differ only in
    the inputs they take; defined in ``layer``'s module, so they pickle by name."""
    return tuple(
        type(f"{name}{d}d", (layer,), {"__doc__": layer.__doc__ + f"\n    {text}\n", "_allowed_dims": dims,
                                      "__module__": layer.__module__, "__qualname__": f"{name}{d}d"})
        for d, (dims, text) in sorted(_INPUTS.items()))


class _NormBase(nn.Module):
    """Parameters, buffers and state-dict behaviour shared with ``nn.BatchNorm*d``."""

    _version = 2
    _allowed_dims = (4,)

    def __init__(self, num_features: int, stats_size: int, eps: float, momentum: Optional[float],
                 affine: bool, track_running_stats: bool, backend: Optional[str],
                 sync: bool = False, process_group=None, device=None, dtype=None, bias: bool = True):
        super().__init__()
        _checks.check_hyper("num_features", num_features, low=1, integer=True)
        _checks.check_eps(eps)
        _checks.check_momentum(momentum)
        if backend is not None:
            if backend not in BACKEND_NAMES:
                raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
            load_backend(backend)  # now, not at a first call that torch.compile may be tracing
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

    def _tensors(self):
        """``(weight, bias, running_mean, running_var, num_batches_tracked)`` as the layer
        holds them (:func:`held`)."""
        p, b = self._parameters, self._buffers
        return (held(self, p, "weight"), held(self, p, "bias"), held(self, b, "running_mean"),
                held(self, b, "running_var"), held(self, b, "num_batches_tracked"))

    def _plain_input(self, input, rm: Optional[torch.Tensor], w: Optional[torch.Tensor]) -> bool:
        """Whether the input and the layer's tensors are plainly what the kernels take: a
        tensor of an allowed rank with the layer's channels, on the buffers' device, with
        dtypes the kernels take as they are, for a compiled backend chosen by argument or by
        default (``resolve`` then honours STOCHNORM_EXT_BACKEND). ``rm``, ``w``: the layer's
        running mean and weight (read once per call: module attribute reads cost here)."""
        if (self.backend not in _COMPILED_BACKENDS or rm is None or type(input) is not torch.Tensor
                or input.dim() not in self._allowed_dims or input.shape[1] != self.num_features
                or input.device != rm.device):
            return False
        dtype = input.dtype
        return ((dtype is rm.dtype or (dtype in _HALF_DTYPES and rm.dtype is torch.float32))
                and rm.dtype in _checks.FLOAT_DTYPES and (w is None or w.dtype is rm.dtype))

    def _plain_call(self, input, rm: Optional[torch.Tensor], w: Optional[torch.Tensor]) -> bool:
        """Whether a call is plainly valid: :meth:`_plain_input`, the layer's hyper-parameters
        in range, no sync, outside torch.func transforms and export. Such calls go straight to
        the backend, so that a call costs about what ``nn.BatchNorm*d``'s does; every other call
        takes the functional form, which checks everything and raises the layer's own errors."""
        eps, momentum = self.eps, self.momentum
        return (self._plain_input(input, rm, w) and not self.sync
                and type(eps) is float and 0.0 < eps < math.inf
                and (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
                and torch._C._functorch.maybe_current_level() is None and not torch.compiler.is_exporting())

    def _eval_as_batch_norm(self, input) -> Optional[torch.Tensor]:
        """Eval of a layer whose eval is BatchNorm with the running statistics (StochNorm, CBN):
        ``F.batch_norm`` itself, what the compiled backends run (None: the general path)."""
        # (F.batch_norm takes part in torch.func transforms and export as it is; the variable
        # may name the reference, or a backend that does not exist: the general path then.)
        w, b, rm, rv, _ = self._tensors()
        eps = self.eps
        if not (self._plain_input(input, rm, w) and type(eps) is float and 0.0 <= eps < math.inf) \
                or (self.backend is None and env_backend()):
            return None
        return F.batch_norm(input, rm, rv, w, b, False, 0.0, eps)

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
