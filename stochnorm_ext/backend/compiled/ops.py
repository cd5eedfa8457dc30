"""Python side of the compiled ops ``torch.ops.stochnorm_ext.*`` (schemas: ``csrc/ops.cpp``).

Importing this module loads ``stochnorm_ext._C`` (raises ImportError, saying what is missing and
how to fix it, when it is not built or does not load: ``_extension.load``) and
registers, for every op, a fake (meta) implementation for torch.compile / FakeTensor, and the
autograd formulas of the segment passes. These registrations are device-independent: a CUDA
build registers its kernels under the CUDA key of the same schemas and reuses them.

Ops (schemas and their contract: ``csrc/ops.cpp``; tables are per statistic in the
accumulation dtype: float32, float64 for float64 input; ``segment_stats`` returns float64
tables for every input, so that segments and ranks merge at a large common offset):

- statistics ops, one per layer: ``stoch_norm_stats``, ``batch_group_norm_stats``,
  ``cross_iteration_norm_stats`` (update the running statistics and the step count in place;
  not differentiable);
- ``norm_apply`` and the one layer-agnostic ``norm_backward`` (autograd in C++:
  ``csrc/autograd.cpp``);
- the four passes for distributed sync: ``segment_stats``, ``segment_apply``,
  ``segment_grad_sums``, ``segment_grad_apply``;
- CBN's window steps: ``cbn_window_compensate``, ``cbn_window_store`` (in place; not
  differentiable);
- private: ``_device_launches()`` (device launches since load, for the tests).

Double backward is not supported: differentiating a backward op raises a RuntimeError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._extension import load as _load_extension
# The memory format the kernels give an output: channels_last(_3d) for such inputs, else
# contiguous (``output_format`` in csrc/common.h follows the same rule).
from ..._rules import memory_format_of

_load_extension()  # the shared library registers the schemas and the CPU (and CUDA) kernels
ops = torch.ops.stochnorm_ext

__all__ = ["ops", "defaults"]


class _Defaults:
    """The ``.default`` overloads (``defaults.segment_stats`` is
    ``torch.ops.stochnorm_ext.segment_stats.default``): calling an OpOverload skips the
    packet's overload resolution, which is measurable next to small kernels."""

    def __getattr__(self, name):
        overload = getattr(ops, name).default
        setattr(self, name, overload)
        return overload


defaults = _Defaults()


# ------------------------------------------------------------------------------- helpers
def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_input(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _table(x: Tensor, *shape) -> Tensor:
    return x.new_empty(shape, dtype=_acc_dtype(x))


# ------------------------------------------------------------------------------- fake impls
@torch.library.register_fake("stochnorm_ext::segment_stats")
def _(input, pieces):  # float64 tables for every input dtype (csrc/ops.cpp)
    shape = (input.shape[1], pieces)
    return input.new_empty(shape, dtype=torch.float64), input.new_empty(shape, dtype=torch.float64)


@torch.library.register_fake("stochnorm_ext::segment_apply")
def _(input, center, scale, shift):
    return _like_input(input)


@torch.library.register_fake("stochnorm_ext::segment_grad_sums")
def _(grad_output, input, center):
    pieces = center.shape[1] if center.dim() == 2 else 1
    return _table(input, input.shape[1], pieces), _table(input, input.shape[1], pieces)


@torch.library.register_fake("stochnorm_ext::segment_grad_apply")
def _(grad_output, input, center, k_dy, k_x, k_0):
    return _like_input(input)


def _stats_tables(x: Tensor, num_stats: int, count: int):
    return tuple(_table(x, num_stats) for _ in range(count))


@torch.library.register_fake("stochnorm_ext::stoch_norm_stats")
def _(input, running_mean, running_var, mask, momentum, num_batches_tracked, update_stats):
    return _stats_tables(input, input.shape[1], 3)  # center, var, red


@torch.library.register_fake("stochnorm_ext::batch_group_norm_stats")
def _(input, num_groups, running_mean, running_var, momentum, num_batches_tracked, update_stats):
    return _stats_tables(input, num_groups, 3)


@torch.library.register_fake("stochnorm_ext::cross_iteration_norm_stats")
def _(input, running_mean, running_var, past_mean, past_var, past_keep, momentum, num_batches_tracked,
      update_stats):
    return _stats_tables(input, input.shape[1], 5)  # mu_t, var_t, center, var, red


@torch.library.register_fake("stochnorm_ext::norm_apply")
def _(input, weight, bias, center, var, red, num_groups, eps):
    return _like_input(input)


@torch.library.register_fake("stochnorm_ext::norm_backward")
def _(grad_output, input, weight, center, var, red, num_groups, eps, output_mask):
    """Unrequested gradients are zero-size; parameter gradients in the weight's dtype (the
    accumulation dtype without weight)."""
    C = input.shape[1]
    dtype = weight.dtype if weight is not None else _acc_dtype(input)
    grad_input = _like_input(input) if output_mask[0] else input.new_empty(0)
    return (grad_input, input.new_empty(C if output_mask[1] else 0, dtype=dtype),
            input.new_empty(C if output_mask[2] else 0, dtype=dtype))


@torch.library.register_fake("stochnorm_ext::cbn_window_compensate")
def _(mean, var, dmu, dvar, dmu_w, dvar_w, valid, step, conv_weight, rho, burnin):
    return (mean.new_empty(mean.shape, dtype=torch.float64), mean.new_empty(mean.shape, dtype=torch.float64),
            mean.new_empty(mean.shape, dtype=torch.bool))


@torch.library.register_fake("stochnorm_ext::cbn_window_store")
def _(mean, var, dmu, dvar, dmu_w, dvar_w, valid, head, step, mu_t, var_t, new_dmu, new_dvar, conv_weight,
      dots_mean, dots_var, burnin):
    return None


# ------------------------------------------------------------------------------- autograd
# norm_apply / norm_backward / the statistics ops: in C++ (csrc/autograd.cpp).
def _grad_for(ctx, index: int, grad):
    """A gradient only for inputs that asked for one."""
    return grad if ctx.needs_input_grad[index] else None


# Core ops: differentiable building blocks ------------------------------------------------
def _per_segment(table: Tensor, x: Tensor) -> Tensor:
    """A (C, P) or (C,) table broadcast over x (N, C, *S) as (1, C, P, 1): piece p of a
    channel is its p-th run of S / P flattened positions."""
    C = x.shape[1]
    return table.reshape(1, C, -1, 1)


def _segment_stats_setup(ctx, inputs, output):
    x, pieces = inputs
    ctx.save_for_backward(x, output[0])
    ctx.pieces = pieces


def _segment_stats_backward(ctx, grad_mean, grad_m2):
    # mean = sum(x) / n and m2 = sum((x - mean)^2): d/dx = grad_mean / n + 2 (x - mean) grad_m2.
    x, mean = ctx.saved_tensors
    N, C = x.shape[:2]
    n = x.numel() // (C * ctx.pieces)
    acc = _acc_dtype(x)
    xs = x.to(acc).reshape(N, C, ctx.pieces, -1)
    grad = _per_segment(grad_mean, x) / n + 2 * (xs - _per_segment(mean, x)) * _per_segment(grad_m2, x)
    return grad.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format_of(x)), None


torch.library.register_autograd("stochnorm_ext::segment_stats", _segment_stats_backward,
                                setup_context=_segment_stats_setup)


def _segment_apply_setup(ctx, inputs, output):
    x, center, scale, shift = inputs
    ctx.save_for_backward(x, center, scale)
    ctx.table_dtypes = (center.dtype, scale.dtype, shift.dtype)


def _segment_apply_backward(ctx, grad_y):
    # y = (x - center) * scale + shift: the backward passes of the core give every gradient.
    x, center, scale = ctx.saved_tensors
    sum_dy, sum_dy_xc = ops.segment_grad_sums(grad_y, x, center)
    grad_x = None
    if ctx.needs_input_grad[0]:
        zeros = torch.zeros_like(sum_dy)
        grad_x = ops.segment_grad_apply(grad_y, x, center, scale, zeros, zeros)
    shape = center.shape
    grad_center = (-sum_dy * scale.reshape(sum_dy.shape)).reshape(shape).to(ctx.table_dtypes[0])
    grad_scale = sum_dy_xc.reshape(scale.shape).to(ctx.table_dtypes[1])
    grad_shift = sum_dy.reshape(shape).to(ctx.table_dtypes[2])
    return (grad_x, _grad_for(ctx, 1, grad_center), _grad_for(ctx, 2, grad_scale), _grad_for(ctx, 3, grad_shift))


torch.library.register_autograd("stochnorm_ext::segment_apply", _segment_apply_backward,
                                setup_context=_segment_apply_setup)


# Backward ops: no double backward --------------------------------------------------------
def _no_double_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"stochnorm_ext: double backward (differentiating {name}) is not supported; the "
            "layers' gradients are computed by fused kernels that have no derivative of their own. "
            "Use the reference backend (backend='reference') if you need second derivatives.")

    def setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(f"stochnorm_ext::{name}", backward, setup_context=setup_context)


for _name in ("segment_grad_sums", "segment_grad_apply"):
    _no_double_backward(_name)
del _name
