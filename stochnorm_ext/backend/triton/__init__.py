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

The layer functions are the one composition of every provider over its ops
(``stochnorm_ext.backend.layers``: the statistics op, then the apply op).

Without Triton (or with a torch older than 2.6) the package still imports and sets
``UNAVAILABLE`` to the reason.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layers import KernelLayers, ProviderOps
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


# The layer functions: the one composition of every provider over these ops (..layers); the
# kernels read x dense in its own memory format, made so once per call.
if UNAVAILABLE is None:
    _ops = torch.ops.stochnorm_ext
    _layers = KernelLayers(ProviderOps(
        _ops.triton_stoch_norm_stats.default, _ops.triton_batch_group_norm_stats.default,
        _ops.triton_cross_iteration_norm_stats.default, _ops.triton_norm_apply.default,
        prepare=lambda x: dense_layout(x)[0]))
    stoch_norm = _layers.stoch_norm
    batch_group_norm = _layers.batch_group_norm
    cross_iteration_norm = _layers.cross_iteration_norm
    compensated_past = _layers.compensated_past  # the plain-PyTorch window steps
    push_entry = _layers.push_entry
