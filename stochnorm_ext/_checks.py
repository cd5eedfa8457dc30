"""Input validation shared by the functional API and the modules.

Every check runs before any state is touched, so a call that raises leaves running
statistics and layer state exactly as they were (docs/SPEC.md, shared rules).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import torch

# The shared rules, for the callers that validate and shape outputs alike.
from ._rules import accumulate_dtype, grouping, memory_format_of  # noqa: F401

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_hyper(name: str, value, *, low=None, high=None, integer=False, low_open=False) -> None:
    """Raise ValueError/TypeError for a hyper-parameter outside its range."""
    kind = type(value)
    # Plain floats and ints first: the numbers ABCs cost microseconds per call, and these
    # checks run on every call of the layers.
    if kind is int if integer else (kind is float or kind is int):
        pass
    elif integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_eps(eps, training: bool = True) -> None:
    """``eps`` as ``F.batch_norm`` takes it: positive in training (a zero-variance channel
    would divide by zero), non-negative in eval."""
    check_hyper("eps", eps)
    if training and eps <= 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    if eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps!r}")


def check_momentum(momentum) -> None:
    if momentum is not None:
        check_hyper("momentum", momentum, low=0.0, high=1.0)


def check_input(x, num_features: Optional[int], allowed_dims: Iterable[int], layer: str) -> None:
    """The input is a floating tensor of an allowed rank with the expected channel count."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{layer}: expected a float16, bfloat16, float32 or float64 input, got {x.dtype}"
        )
    allowed_dims = tuple(allowed_dims)
    if x.dim() not in allowed_dims:
        want = " or ".join(f"{d}D" for d in allowed_dims)
        raise ValueError(f"{layer}: expected {want} input, got {x.dim()}D input of shape {tuple(x.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels (dim 1), got input of shape {tuple(x.shape)}"
        )


def check_param(t: Optional[torch.Tensor], name: str, shape, x: torch.Tensor, layer: str) -> None:
    """A per-channel parameter/buffer: right shape, floating dtype, on the input's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: {name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{layer}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise RuntimeError(
            f"{layer}: {name} is on {t.device} but the input is on {x.device}; "
            f"all tensors must be on the same device (the input is on {x.device}, {name} on {t.device})"
        )


def check_counter(t, x: torch.Tensor, layer: str) -> None:
    """``num_batches_tracked``: a 0-dim integer tensor on the input's device, or None."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 0 or t.dtype.is_floating_point or t.dtype == torch.bool \
            or t.is_complex():
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{layer}: num_batches_tracked must be a 0-dim integer tensor or None, got {got}")
    if t.device != x.device:
        raise RuntimeError(f"{layer}: num_batches_tracked is on {t.device} but the input is on {x.device}")


def check_values_per_statistic(count: int, x: torch.Tensor, layer: str) -> None:
    """Training with one value per statistic is undefined (PyTorch raises the same)."""
    if count == 1:
        raise ValueError(
            f"{layer}: expected more than 1 value per statistic when training, "
            f"got input of shape {tuple(x.shape)}"
        )


def spatial_size(x: torch.Tensor) -> int:
    return math.prod(x.shape[2:])


def stat_dims(x: torch.Tensor):
    """Reduction dims of a per-channel statistic: every dim but the channel dim."""
    return [0] + list(range(2, x.dim()))


def check_num_groups(num_groups: int, num_features: int) -> None:
    """Construction-time rule of BGN: G divides C, or G is a multiple of C."""
    check_hyper("num_groups", num_groups, low=1, integer=True)
    try:
        grouping(num_features, num_groups)
    except ValueError:
        raise ValueError(
            f"num_groups must divide num_features or be a multiple of it, "
            f"got num_groups={num_groups}, num_features={num_features}"
        ) from None


def check_groups_fit(num_groups: int, x: torch.Tensor, layer: str) -> int:
    """Call-time rule of BGN with G > C: each channel splits into G/C equal spatial pieces.

    Returns the number of pieces per channel (1 when G divides C).
    """
    C = x.shape[1]
    try:
        pieces = grouping(C, num_groups).pieces
    except ValueError as error:
        raise ValueError(f"{layer}: {error}") from None
    if pieces == 1:
        return 1
    S = spatial_size(x)
    if S % pieces != 0:
        raise ValueError(
            f"{layer}: num_groups={num_groups} splits each of the {C} channels into {pieces} pieces, "
            f"which needs the spatial size to be a multiple of {pieces}; got spatial shape "
            f"{tuple(x.shape[2:])} ({S} positions)"
        )
    return pieces


# ------------------------------------------------------------------- CBN
def check_window(layer, x, window) -> None:
    """Every tensor of the window is on the input's device, with the dtype its field needs
    (checked before anything changes: a window elsewhere must not get half an update)."""
    for field, t in zip(type(window)._fields, window):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{layer}: window.{field} must be a tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise RuntimeError(f"{layer}: the window (window.{field}) is on {t.device} but the input "
                               f"is on {x.device}; create it on the input's device (CBNWindow.empty(..., "
                               "device=...)) or move it")
        if field == "valid":
            ok, want = t.dtype == torch.bool, "torch.bool"
        elif field in ("head", "step"):
            ok, want = t.dtype == torch.long, "torch.int64"
        else:
            ok, want = t.dtype in FLOAT_DTYPES, "a floating dtype"
        if not ok:
            raise TypeError(f"{layer}: window.{field} must be {want}, got {t.dtype}")


def check_conv(layer, x, conv_input, conv_weight, geometry, window) -> None:
    """The conv arguments describe a convolution whose output has x's shape."""
    for name, t in (("conv_input", conv_input), ("conv_weight", conv_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{layer}: a window > 1 needs {name} (a tensor), got {type(t).__name__}")
        if t.device != x.device:
            raise RuntimeError(f"{layer}: {name} is on {t.device} but the input is on {x.device}")
        if t.dim() != 4:
            raise ValueError(f"{layer}: {name} must be 4D, got shape {tuple(t.shape)}")
    C, cin_g, kh, kw = conv_weight.shape
    G = geometry.groups
    if C != x.shape[1] or C % G or tuple(window.dvar.shape[1:]) != (C, cin_g * kh * kw) \
            or window.dmu.shape[1] != G:
        raise ValueError(
            f"{layer}: conv_weight of shape {tuple(conv_weight.shape)} with groups={G} does not fit "
            f"the input's {x.shape[1]} channels and the window (made for {window.dvar.shape[1]} "
            f"channels of {window.dvar.shape[2]} weights each, {window.dmu.shape[1]} groups)")
    if conv_input.shape[1] != cin_g * G or conv_input.shape[0] != x.shape[0]:
        raise ValueError(f"{layer}: conv_input of shape {tuple(conv_input.shape)} does not fit "
                         f"conv_weight {tuple(conv_weight.shape)} with groups={G} and input batch {x.shape[0]}")
    left, right, top, bottom = geometry.input_pad
    H, W = conv_input.shape[2] + top + bottom, conv_input.shape[3] + left + right
    out = tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip((H, W), geometry.padding, geometry.dilation, (kh, kw), geometry.stride))
    if out != tuple(x.shape[2:]):
        raise ValueError(f"{layer}: the conv maps conv_input {tuple(conv_input.shape)} to spatial size {out}, "
                         f"but the input has spatial size {tuple(x.shape[2:])}")
