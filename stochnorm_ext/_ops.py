"""Python side of the compiled ops ``torch.ops.stochnorm_ext.*`` (schemas: ``csrc/ops.cpp``).

Importing this module loads ``stochnorm_ext._C`` (raises ImportError, saying what is missing and
how to fix it, when it is not built or does not load: ``_extension.load``) and
registers, for every op, a fake (meta) implementation for torch.compile / FakeTensor, and for
the differentiable ones an autograd formula. These registrations are device-independent: a
CUDA build registers its kernels under the CUDA key of the same schemas and reuses them.

Ops (tables are ``(C, P)`` or ``(C,)`` in the accumulation dtype: float32, float64 for float64
input; ``segment_stats`` returns float64 tables for every input, so that segments and ranks
merge at a large common offset):

- shared core: ``segment_stats``, ``segment_apply``, ``segment_grad_sums``,
  ``segment_grad_apply``, ``update_running_stats`` (in place);
- layers: ``stoch_norm_forward/backward``, ``batch_group_norm_forward/backward``,
  ``cross_iteration_norm_forward/backward``. The forward ops are functional and return
  ``(output, batch_mean, batch_var, center, invstd)``; the caller updates the running
  statistics with ``update_running_stats`` (register_autograd needs functional ops).

Double backward is not supported: differentiating a backward op raises a RuntimeError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._extension import load as _load_extension
# The memory format the kernels give an output: channels_last(_3d) for such inputs, else
# contiguous (``output_format`` in csrc/common.h follows the same rule).
from ._checks import memory_format_of

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


def _param_grads(x: Tensor, weight):
    C = x.shape[1]
    dtype = weight.dtype if weight is not None else _acc_dtype(x)
    return x.new_empty(C, dtype=dtype), x.new_empty(C, dtype=dtype)


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


@torch.library.register_fake("stochnorm_ext::update_running_stats")
def _(running_mean, running_var, batch_mean, batch_var, count, momentum):
    return None


def _forward_fake(x: Tensor, stats: int, batch_stats: bool):
    """output, batch_mean, batch_var (empty without batch statistics), center, invstd."""
    n = stats if batch_stats else 0
    return _like_input(x), _table(x, n), _table(x, n), _table(x, stats), _table(x, stats)


@torch.library.register_fake("stochnorm_ext::stoch_norm_forward")
def _(input, weight, bias, running_mean, running_var, mask, eps):
    return _forward_fake(input, input.shape[1], mask is not None)


@torch.library.register_fake("stochnorm_ext::batch_group_norm_forward")
def _(input, num_groups, weight, bias, running_mean, running_var, use_batch_stats, eps):
    return _forward_fake(input, num_groups, use_batch_stats)


@torch.library.register_fake("stochnorm_ext::cross_iteration_norm_forward")
def _(input, weight, bias, running_mean, running_var, past_mean, past_var, past_keep, use_batch_stats, eps):
    return _forward_fake(input, input.shape[1], use_batch_stats)


@torch.library.register_fake("stochnorm_ext::stoch_norm_backward")
def _(grad_output, input, weight, mask, center, invstd):
    return (_like_input(input),) + _param_grads(input, weight)


@torch.library.register_fake("stochnorm_ext::batch_group_norm_backward")
def _(grad_output, input, num_groups, weight, center, invstd, use_batch_stats):
    return (_like_input(input),) + _param_grads(input, weight)


@torch.library.register_fake("stochnorm_ext::cross_iteration_norm_backward")
def _(grad_output, input, weight, center, invstd, past_keep, use_batch_stats):
    return (_like_input(input),) + _param_grads(input, weight)


# ------------------------------------------------------------------------------- autograd
def _grad_for(ctx, index: int, grad):
    """A gradient only for inputs that asked for one."""
    return grad if ctx.needs_input_grad[index] else None


def _param_grad(ctx, index: int, grad, param_dtype):
    if not ctx.needs_input_grad[index]:
        return None
    return grad if param_dtype is None or grad.dtype == param_dtype else grad.to(param_dtype)


def _save_for_backward(ctx, x, weight, bias, output, *extra):
    """What every layer's backward reads: the input, the weight, the normalisation tables
    (center, invstd: outputs 3 and 4 of a forward op) and ``extra``; the bias dtype."""
    ctx.save_for_backward(x, weight, output[3], output[4], *extra)
    ctx.bias_dtype = None if bias is None else bias.dtype
    # Batch statistics and the normalisation tables are outputs for the running update and
    # for backward, not differentiable results (running statistics are constants). No zero
    # gradients are made up for them: backward only ever reads the output's gradient.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


# StochNorm ------------------------------------------------------------------------------
def _stoch_norm_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, mask, eps = inputs
    _save_for_backward(ctx, x, weight, bias, output, mask)


def _stoch_norm_backward(ctx, grad_y, *unused):
    if grad_y is None:
        return (None,) * 7
    x, weight, center, invstd, mask = ctx.saved_tensors
    grad_x, grad_w, grad_b = defaults.stoch_norm_backward(grad_y, x, weight, mask, center, invstd)
    return (_grad_for(ctx, 0, grad_x), _param_grad(ctx, 1, grad_w, None),
            _param_grad(ctx, 2, grad_b, ctx.bias_dtype), None, None, None, None)


torch.library.register_autograd("stochnorm_ext::stoch_norm_forward", _stoch_norm_backward,
                                setup_context=_stoch_norm_setup)


# BGN ------------------------------------------------------------------------------------
def _bgn_setup(ctx, inputs, output):
    x, num_groups, weight, bias, running_mean, running_var, use_batch_stats, eps = inputs
    _save_for_backward(ctx, x, weight, bias, output)
    ctx.num_groups, ctx.use_batch_stats = num_groups, use_batch_stats


def _bgn_backward(ctx, grad_y, *unused):
    if grad_y is None:
        return (None,) * 8
    x, weight, center, invstd = ctx.saved_tensors
    grad_x, grad_w, grad_b = defaults.batch_group_norm_backward(grad_y, x, ctx.num_groups, weight, center,
                                                                invstd, ctx.use_batch_stats)
    return (_grad_for(ctx, 0, grad_x), None, _param_grad(ctx, 2, grad_w, None),
            _param_grad(ctx, 3, grad_b, ctx.bias_dtype), None, None, None, None)


torch.library.register_autograd("stochnorm_ext::batch_group_norm_forward", _bgn_backward, setup_context=_bgn_setup)


# CBN ------------------------------------------------------------------------------------
def _cbn_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, past_mean, past_var, past_keep, use_batch_stats, eps = inputs
    _save_for_backward(ctx, x, weight, bias, output, past_keep)
    ctx.use_batch_stats = use_batch_stats


def _cbn_backward(ctx, grad_y, *unused):
    if grad_y is None:
        return (None,) * 10
    x, weight, center, invstd, past_keep = ctx.saved_tensors
    grad_x, grad_w, grad_b = defaults.cross_iteration_norm_backward(grad_y, x, weight, center, invstd,
                                                                    past_keep, ctx.use_batch_stats)
    # The compensated past statistics are constants (docs/SPEC.md): no gradient flows into them.
    return (_grad_for(ctx, 0, grad_x), _param_grad(ctx, 1, grad_w, None),
            _param_grad(ctx, 2, grad_b, ctx.bias_dtype), None, None, None, None, None, None, None)


torch.library.register_autograd("stochnorm_ext::cross_iteration_norm_forward", _cbn_backward,
                                setup_context=_cbn_setup)


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


for _name in ("stoch_norm_backward", "batch_group_norm_backward", "cross_iteration_norm_backward",
              "segment_grad_sums", "segment_grad_apply"):
    _no_double_backward(_name)
del _name
