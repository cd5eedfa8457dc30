"""The ``triton`` provider: the op contract (docs/DESIGN.md) on Triton kernels, and the
layer functions of the backend interface over its ops.

    plan.py           launch planning (tiles, grids, finalize blocks); plain Python
    launch.py         allocation (poisoned outputs) and the recorded launch helper
    kernels.py        forward kernels (design notes in its docstring), tiling.py their helpers
    grad_kernels.py   backward kernels
    ops.py            the torch.library ops (triton_op) and their autograd
    compile_check.py  python -m stochnorm_ext.backend.triton.compile_check: every kernel
                      variant compiled for an NVIDIA target, no GPU needed

Dtypes: float32/float16/bfloat16 inputs accumulate in float32; float64 inputs run the same
kernels in float64, exact to float64 rounding (float scalars are float64 kernel arguments).

A training step is the statistics op (statistics, coefficients, running-statistics update
and step count in place) then the apply op; nothing after the statistics op can fail for
input that ``stochnorm_ext.functional`` validated, so a failed call leaves the running
statistics as they were without copying them. Eval of StochNorm and CBN with running
statistics is ``F.batch_norm``.

Without Triton (or with a torch older than 2.6) the package still imports and sets
``UNAVAILABLE`` to the reason.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._checks import accumulate_dtype
from .launch import POISON_ENV, recording  # noqa: F401  (tests, bench)
from .plan import TUNING, dense_layout, plan_for_shape  # noqa: F401

UNAVAILABLE: Optional[str] = None
try:
    import triton  # noqa: F401
except ImportError as exc:  # the package must import without triton
    UNAVAILABLE = f"triton is not installed ({exc})"
else:
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        UNAVAILABLE = f"the triton backend needs torch >= 2.6 (torch.library.triton_op), found {torch.__version__}"

if UNAVAILABLE is None:
    from . import ops  # noqa: F401  (defines the torch.ops.stochnorm_ext.triton_* ops)


def __getattr__(name):
    # PASSES (the four passes for distributed sync): this provider has none of its own and
    # uses the plain-PyTorch ones of reference.py, looked up when asked for (a reference
    # without PASSES makes the attribute missing, not the import fail).
    if name == "PASSES":
        from ... import reference
        return reference.PASSES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _momentum(momentum) -> Optional[float]:
    return None if momentum is None else float(momentum)


def _batch_norm_eval(x, weight, bias, running_mean, running_var, eps):
    """Eval StochNorm / CBN: F.batch_norm with the running statistics. F.batch_norm takes
    parameters of x's dtype, or float32 ones with a half/bfloat16 x; other mixes (float32
    buffers with a float64 x, a half weight with float32 buffers) go in the accumulation dtype,
    as the reference computes them (exact for a float64 x)."""
    params = (running_mean, running_var, weight, bias)
    if any(t is not None and t.dtype != x.dtype for t in params):
        acc = accumulate_dtype(x)
        params = tuple(None if t is None else t.to(acc) for t in params)
    return F.batch_norm(x, params[0], params[1], params[2], params[3], False, 0.0, eps)


def _running_as_stats(running_mean, running_var, x):
    """Eval BGN: the running statistics are the (constant) statistics, in the accumulation
    dtype the kernels read (no copy when they already are)."""
    acc = accumulate_dtype(x)
    return running_mean.detach().to(acc), running_var.detach().to(acc), None


def stoch_norm(x, weight, bias, running_mean, running_var, mask, training, momentum, eps,
               update_stats=True, num_batches_tracked=None):
    x = dense_layout(x)[0]  # once here, not in every op (differentiable copy if strided)
    if not training:
        return _batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
    stats = torch.ops.stochnorm_ext.triton_stoch_norm_stats(
        x.detach(), running_mean, running_var, mask, _momentum(momentum), num_batches_tracked,
        bool(update_stats))
    return torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, *stats, x.shape[1], float(eps))


def batch_group_norm(x, num_groups, weight, bias, running_mean, running_var, training, momentum,
                     eps, update_stats=True, num_batches_tracked=None):
    x = dense_layout(x)[0]
    if training or running_mean is None:
        stats = torch.ops.stochnorm_ext.triton_batch_group_norm_stats(
            x.detach(), int(num_groups), running_mean, running_var, _momentum(momentum),
            num_batches_tracked, bool(training and update_stats))
    else:
        stats = _running_as_stats(running_mean, running_var, x)
    return torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, *stats, int(num_groups), float(eps))


def cross_iteration_norm(x, weight, bias, running_mean, running_var, past_mean, past_var,
                         past_keep, training, momentum, eps, update_stats=True, num_batches_tracked=None):
    x = dense_layout(x)[0]
    if not training and running_mean is not None:
        y = _batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
        return y, running_mean.detach(), running_var.detach()
    mu_t, var_t, center, var, red = torch.ops.stochnorm_ext.triton_cross_iteration_norm_stats(
        x.detach(), running_mean, running_var, past_mean, past_var, past_keep, _momentum(momentum),
        num_batches_tracked, bool(training and update_stats))
    y = torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, center, var, red, x.shape[1], float(eps))
    return y, mu_t, var_t
