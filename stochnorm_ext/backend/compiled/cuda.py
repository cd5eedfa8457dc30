"""The ``"cuda"`` backend: the CUDA C++ kernels of ``stochnorm_ext._C`` (``csrc/cuda/``).

The CUDA kernels are registered under the CUDA dispatch key of the same custom ops as the
CPU ones (``torch.ops.stochnorm_ext.*``, schemas in ``csrc/ops.cpp``), and the fake
implementations of ``ops.py`` and the C++ autograd (``csrc/autograd.cpp``) are shared by
every device. So the three layer functions and ``PASSES`` are the device-agnostic ones of
``backend/compiled/__init__.py`` (same interface and semantics as ``reference.py``, see ``_backend.py``);
this module re-exports them and says whether CUDA kernels were compiled into the extension.

``UNAVAILABLE`` is set when the extension is missing or was built without CUDA (no GPU
visible at build time and no ``FORCE_CUDA=1``, nvcc or a CUDA build of torch absent, or
``FORCE_CUDA=0``): the kernels are not compiled in. Compiled in on a machine without a GPU,
the backend is still not usable there: ``_backend.backends()`` says so.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["stoch_norm", "batch_group_norm", "cross_iteration_norm", "compensated_past", "push_entry", "PASSES"]

# Every op of csrc/ops.cpp that has a device kernel (_device_launches is device-independent).
CUDA_OPS = (
    "segment_stats", "segment_apply", "segment_grad_sums", "segment_grad_apply",
    "stoch_norm_stats", "batch_group_norm_stats", "cross_iteration_norm_stats",
    "norm_apply", "norm_backward", "cbn_window_compensate", "cbn_window_store",
)

UNAVAILABLE: Optional[str] = None


def _missing_cuda_kernels():
    """The ops of CUDA_OPS without a CUDA kernel (all of them for a CPU-only build)."""
    return [name for name in CUDA_OPS
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"stochnorm_ext::{name}", "CUDA")]


try:
    from . import ops  # noqa: F401  (loads _C: schemas, CPU and, if built, CUDA kernels)
except ImportError as exc:  # not built (or built against another torch): the message says which
    UNAVAILABLE = str(exc)
else:
    _missing = _missing_cuda_kernels()
    if len(_missing) == len(CUDA_OPS):
        UNAVAILABLE = ("not compiled in: stochnorm_ext._C was built without CUDA kernels (they are built "
                       "where a GPU is visible, or with FORCE_CUDA=1; both need nvcc and a CUDA build of torch)")
    elif _missing:
        UNAVAILABLE = f"stochnorm_ext._C has no CUDA kernel for {', '.join(_missing)}"
    del _missing

# The layer functions only call torch.ops.stochnorm_ext.*, which dispatch on the tensors'
# device: the CPU backend's wrappers serve CUDA tensors unchanged.
from . import (PASSES, batch_group_norm, compensated_past, cross_iteration_norm, push_entry,  # noqa: E402,F401
               stoch_norm)
