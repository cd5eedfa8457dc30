"""The backend registry: which implementation runs a layer, and why another cannot.

A backend is a module that satisfies :class:`Backend` (the three layer functions and the
four per-segment passes that distributed sync composes with collectives). Names:
``"reference"`` (pure PyTorch, ``stochnorm_ext.reference``, always there), ``"cpu"`` and
``"cuda"`` (the C++ kernels), ``"triton"`` (GPU kernels, ``stochnorm_ext.backend.triton``).
``backend=None`` picks the best available one for the input's device; the environment
variable ``STOCHNORM_EXT_BACKEND`` replaces that default (an explicit ``backend=``
argument still wins). :func:`backends` maps every name to ``None`` (usable here) or the
reason it is not.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Dict, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .. import _environ, _extension

class SegmentPasses(Protocol):
    """The four big passes over per-segment tables (a segment: what one statistic covers
    inside one channel; tables ``(C, P)``), which distributed sync composes with collectives."""

    def stats(self, x: Tensor, pieces: int) -> Tuple[Tensor, Tensor]: ...          # float64 (mean, M2)
    def apply(self, x: Tensor, center: Tensor, scale: Tensor, shift: Tensor) -> Tensor: ...
    def grad_sums(self, dy: Tensor, x: Tensor, center: Tensor) -> Tuple[Tensor, Tensor]: ...
    def grad_apply(self, dy: Tensor, x: Tensor, center: Tensor, k_dy: Tensor, k_x: Tensor,
                   k_0: Tensor) -> Tensor: ...


class Backend(Protocol):
    """What every backend module provides. The arguments are validated by
    ``stochnorm_ext.functional`` before a backend sees them. Training with ``update_stats``
    updates the running statistics in place and, when ``num_batches_tracked`` is given,
    increments it (``momentum=None``: the cumulative factor ``1 / num_batches_tracked``
    read from the tensor). Outputs keep the input's dtype and memory format."""

    PASSES: SegmentPasses

    def stoch_norm(self, x, weight, bias, running_mean, running_var, mask, training, momentum, eps,
                   update_stats=True, num_batches_tracked=None) -> Tensor: ...

    def batch_group_norm(self, x, num_groups, weight, bias, running_mean, running_var, training,
                         momentum, eps, update_stats=True, num_batches_tracked=None) -> Tensor: ...

    def cross_iteration_norm(self, x, weight, bias, running_mean, running_var, past_mean, past_var,
                             past_keep, training, momentum, eps, update_stats=True,
                             num_batches_tracked=None) -> Tuple[Tensor, Tensor, Tensor]: ...

    # CBN's window steps (``stochnorm_ext.cbn_window``'s definitions; a provider may run each
    # as one op). No host synchronisation.
    def compensated_past(self, window, conv_weight, rho, burnin) -> Tuple[Tensor, Tensor, Tensor]: ...

    def push_entry(self, window, mu_t, var_t, dmu, dvar, conv_weight, burnin, dots=None) -> None: ...


BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "STOCHNORM_EXT_BACKEND"

# Preference order for backend=None, per device type; the first available one wins.
_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
# Where each backend's implementation lives (module path relative to the stochnorm_ext package).
_MODULES = {"reference": ".reference", "cpu": ".backend.compiled", "triton": ".backend.triton",
            "cuda": ".backend.compiled.cuda"}
_PACKAGE = __package__.rpartition(".")[0]  # stochnorm_ext
# Device types each backend runs on ("triton" runs on CPU tensors only under the interpreter).
_DEVICES = {"reference": None, "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}
_read_env_backend = _environ.reader(ENV_VAR)


def env_backend() -> Optional[str]:
    """The backend ``STOCHNORM_EXT_BACKEND`` names (None: unset or empty), read at every call:
    setting the variable takes effect at the next layer call."""
    return _read_env_backend() or None


_loaded: Dict[str, object] = {}
_resolved: Dict[tuple, object] = {}
_missing: Dict[str, str] = {}


def _load(name: str):
    """Import a backend, remembering why it is unavailable if it is."""
    if name in _loaded:
        return _loaded[name]
    if name in _missing:
        return None
    try:
        module = importlib.import_module(_MODULES[name], _PACKAGE)
    except ModuleNotFoundError as exc:
        if exc.name == _PACKAGE + _MODULES[name]:
            _missing[name] = f"this version of stochnorm_ext has no {name!r} kernels"
        else:  # the backend exists but something it needs is not installed or not built
            _missing[name] = f"{type(exc).__name__}: {exc}"
        return None
    except Exception as exc:  # a backend that fails to import must not break the others
        _missing[name] = f"{type(exc).__name__}: {exc}"
        return None
    reason = getattr(module, "UNAVAILABLE", None)
    if reason:
        _missing[name] = reason
        return None
    _loaded[name] = module
    _resolved.clear()  # a default choice may change now that this backend is there
    return module


def preload() -> None:
    """Import the backends a default selection can pick, so the first call inside
    ``torch.compile(fullgraph=True)`` does not have to import a module (a graph break).

    Triton only where a default selection picks it (named by the environment variable, or a
    CUDA device without the C++ CUDA kernels) and where it can run: defining its ops imports
    torch._inductor and torch._dynamo with torch 2.11 (seconds), which ``import
    stochnorm_ext`` must not pay. A layer built with ``backend="triton"`` loads it then
    (:func:`load`)."""
    import importlib.util
    for name in ("reference", "cpu", "cuda"):
        _load(name)
    if _load("cpu") is None and _extension.expected():
        # Said once, at import: everything would silently run on the (slower) reference.
        warnings.warn(f"stochnorm_ext runs on the pure-PyTorch reference: {_missing['cpu']}",
                      RuntimeWarning, stacklevel=2)
    picked = env_backend() == "triton" or (torch.cuda.is_available() and "cuda" not in _loaded)
    if picked and importlib.util.find_spec("triton") is not None:
        load("triton")


def load(name: str) -> None:
    """Import backend ``name`` now, outside any compiled region, so that a later call under
    ``torch.compile(fullgraph=True)`` finds it loaded. Whether it is available is said when a
    call resolves it (:func:`resolve`)."""
    if name in _MODULES and _usable_here(name) is None:
        _load(name)


def _usable_here(name: str) -> Optional[str]:
    """Why an installed (compiled-in) backend still cannot run in this process, or None."""
    if name == "cuda" and not torch.cuda.is_available():
        return ("compiled in, but not usable here: no CUDA device is visible "
                "(torch.cuda.is_available() is False)")
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("not usable here: no CUDA device is visible, and on CPU tensors the Triton kernels run "
                "only under Triton's interpreter (TRITON_INTERPRET=1 set before stochnorm_ext is imported)")
    return None


def backends() -> Dict[str, Optional[str]]:
    """Every backend name mapped to ``None`` if it can run here, else the reason why not:
    not installed or not built (the reason says what is missing and how to fix it), or
    installed but without a device to run on (``cuda`` compiled in on a machine with no GPU).

    >>> import stochnorm_ext as sx
    >>> sx.backends()["reference"] is None
    True
    """
    return {name: _reason(name) for name in BACKEND_NAMES}


def _reason(name: str) -> Optional[str]:
    unusable = _usable_here(name)
    if name == "triton" and unusable:
        return unusable  # not imported: its kernels must be defined under the interpreter, if at all
    return _missing[name] if _load(name) is None else unusable


def available_backends():
    """The names of the backends usable in this process."""
    return [name for name, reason in backends().items() if reason is None]


def resolve(backend: Optional[str], device: torch.device):
    """The backend module to run on a tensor of ``device``.

    Raises ValueError for an unknown name and RuntimeError, naming what is missing, for a
    known backend that is not available or does not run on this device.
    """
    if backend is None:
        backend = env_backend()
    key = (backend, device.type)
    module = _resolved.get(key)
    # Every layer call resolves its backend: remember successes (what is loaded does not
    # change once loaded); failures take the full path again and raise.
    if module is None:
        module = _resolved[key] = _resolve(backend, device)
    return module


def _resolve(backend: Optional[str], device: torch.device):
    if backend is None:
        backend = env_backend()
    if backend is None:
        for name in _DEFAULT_ORDER.get(device.type, ("reference",)):
            if runs_on(name, device) and _load(name) is not None:
                return _loaded[name]
        return _load("reference")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKEND_NAMES)}")
    module = _load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not available: {_missing[backend]}")
    if not runs_on(backend, device):
        raise RuntimeError(f"backend {backend!r} does not run on {device.type} tensors")
    return module


def runs_on(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` runs on tensors of ``device`` at all (installed or not):
    the reference everywhere, cpu on CPU, cuda on CUDA, triton on CUDA (and on CPU tensors
    only under the interpreter)."""
    devices = _DEVICES[name]
    if devices is None:
        return True
    if name == "triton" and device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return device.type in devices


def _batched(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is batched by a ``torch.func.vmap`` at some level."""
    functorch = torch._C._functorch
    while isinstance(t, Tensor) and functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _onnx_exporting() -> bool:
    """Inside ``torch.onnx.export`` (which traces with torch.export first)."""
    if not torch.compiler.is_exporting():
        return False
    onnx = sys.modules.get("torch.onnx")  # never imported here: not exporting to ONNX
    return onnx is not None and onnx.is_in_onnx_export()


def resolve_for_call(backend, x: Tensor, running_mean, running_var, updates_running: bool, layer: str):
    """The backend module a layer call runs on (``resolve``, then the exceptions). Inside
    ``torch.func`` transforms (grad, vjp, jacrev, vmap, ...) and ``torch.onnx.export`` that is
    the reference: the kernels' custom ops have
    no functorch rules and no ONNX translation, plain PyTorch ops have both (the reference
    is what every backend is tested against; in eval it is BatchNorm's per-channel affine
    map, BGN's per-group one). Like ``nn.BatchNorm*d``, vmap refuses to update unbatched
    running statistics from a batched input (raised here, before anything changes)."""
    impl = resolve(backend, x.device)  # an unknown or unavailable name still raises
    if _onnx_exporting():
        return resolve("reference", x.device)
    if torch._C._functorch.maybe_current_level() is None:
        return impl
    if updates_running and running_mean is not None and not _batched(running_mean) \
            and not _batched(running_var) and _batched(x):
        raise RuntimeError(
            f"{layer}: under torch.func.vmap the input is batched but running_mean and running_var, "
            "which training updates in place, are not (nn.BatchNorm*d refuses this too); use eval "
            "mode, track_running_stats=False where the layer allows it, or batch the buffers as well")
    return resolve("reference", x.device)
