"""The Triton provider's ops: the op contract (docs/DESIGN.md) with a ``triton_`` prefix,
registered with ``torch.library.triton_op`` (so ``torch.compile`` sees the kernels; under
TRITON_INTERPRET=1 as opaque ``custom_op``s, see ``_define_op``)::

    stochnorm_ext::triton_stoch_norm_stats            stats -> StochNorm finalize (+ EMA)
    stochnorm_ext::triton_batch_group_norm_stats      stats -> batch-stats finalize (+ EMA)
    stochnorm_ext::triton_cross_iteration_norm_stats  stats -> CBN finalize (+ EMA)
    stochnorm_ext::triton_norm_apply                  apply; autograd -> triton_norm_backward
    stochnorm_ext::triton_norm_backward               reduce -> finalize -> apply; no double backward

A statistics op mutates the running statistics (and the step count) declared in its schema,
is not differentiable (PyTorch allows no autograd formula on an op that mutates its
inputs; its outputs never require grad) and checks everything before it mutates anything.
The dependence of the statistics on x is folded into the apply op's backward through the
reduction weight ``red`` (1/M, mask/M or 1/(count_c M)), so the gradient is exact.

Importing this module needs Triton and torch >= 2.6 (the package checks first).
"""
from __future__ import annotations

import math
from typing import List, NoReturn, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from ..._checks import FLOAT_DTYPES, accumulate_dtype
from .grad_kernels import grad_apply_kernel, grad_finalize_kernel, grad_reduce_kernel
from .kernels import (batch_stats_finalize_kernel, cross_iteration_finalize_kernel, norm_apply_kernel,
                      segment_stats_kernel, stoch_norm_finalize_kernel)
from .launch import launch, new, poison
from .plan import Plan, cdiv, grad_finalize_blocks, grouping, plan, small_blocks

_NS = "stochnorm_ext"
# The kernel names above are module globals on purpose: torch's triton_op finds an op's
# kernels (for its compile cache key) by reading the source for wrap_triton(<global name>).
INTERPRETED = type(segment_stats_kernel).__name__ == "InterpretedFunction"


def _define_op(name: str, mutates_args):
    """``triton_op`` on a GPU, so torch.compile traces into the kernels.

    Under the interpreter wrap_triton hands the interpreted kernel back unwrapped, so a
    triton_op would run its kernels even while torch.compile or opcheck trace it with fake
    tensors. There the op is a plain (opaque) ``custom_op`` whose fake implementation is the
    same function with the launches skipped (``_launches``).
    """
    def define(fn):
        if not INTERPRETED:
            return triton_op(name, fn, mutates_args=mutates_args)
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fn)
        return op
    return define


def _launches(t: Tensor) -> bool:
    """False while tracing with fake tensors under the interpreter (shapes are all a fake
    implementation needs); always True on a GPU, where wrap_triton traces."""
    return not (INTERPRETED and is_fake(t))


# ---------------------------------------------------------------------------------------
# Checks: what would crash a kernel (the functional layer validated the rest already)
# ---------------------------------------------------------------------------------------

# Each check formats its message only when it fails: formatting shapes and devices on every
# call cost about 8 us per table here, more than the check itself.
def _fail(op: str, message: str) -> NoReturn:
    raise RuntimeError(f"stochnorm_ext::{op}: {message}")


def _check_table(t: Optional[Tensor], name: str, shape, x: Tensor, op: str, floating=True) -> None:
    if t is None:
        return
    if t.shape != shape:
        _fail(op, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        _fail(op, f"{name} is on {t.device} but the input is on {x.device}")
    if floating and t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be a floating tensor, got {t.dtype}")


def _check_stats_call(op: str, x: Tensor, num_stats: int, running_mean, running_var, momentum,
                      num_batches_tracked, update_stats: bool) -> None:
    """Everything a statistics op needs, checked before it mutates anything."""
    if not (x.dim() >= 2 and x.dtype in FLOAT_DTYPES):
        _fail(op, f"expected a floating input of 2 or more dims, got {x.dtype} of shape {tuple(x.shape)}")
    if (running_mean is None) != (running_var is None):
        _fail(op, "running_mean and running_var must both be given or both be None")
    _check_table(running_mean, "running_mean", (num_stats,), x, op)
    _check_table(running_var, "running_var", (num_stats,), x, op)
    if num_batches_tracked is not None:
        if not (num_batches_tracked.numel() == 1 and num_batches_tracked.device == x.device):
            _fail(op, f"num_batches_tracked must be one value on the input's device, got shape "
                      f"{tuple(num_batches_tracked.shape)} on {num_batches_tracked.device}")
    if update_stats and running_mean is not None:
        M = x.numel() // num_stats
        if M < 2:
            _fail(op, f"updating the running statistics needs at least 2 values per statistic, got {M}")
        if momentum is None and num_batches_tracked is None:
            _fail(op, "momentum=None (cumulative average) needs num_batches_tracked")


def _check_apply_call(op: str, x: Tensor, weight, center, var, red, num_groups: int, bias=None) -> None:
    """What would make the apply or backward kernels read out of bounds. Every statistics op
    returns tables that pass, so for validated input nothing here can fail after the
    running statistics were updated."""
    C = x.shape[1] if x.dim() >= 2 else -1
    if not (C > 0 and num_groups >= 1 and (C % num_groups == 0 or num_groups % C == 0)):
        _fail(op, f"{num_groups} statistics do not fit an input of shape {tuple(x.shape)}")
    for name, t, n in (("weight", weight, C), ("bias", bias, C), ("center", center, num_groups),
                       ("var", var, num_groups), ("red", red, num_groups)):
        _check_table(t, name, (n,), x, op)


# ---------------------------------------------------------------------------------------
# Launch helpers (each returns fresh buffers; an op mutates its state only after every check:
# the step count in its stats kernel, the running statistics in its last step)
# ---------------------------------------------------------------------------------------

def _segment_stats(p: Plan, acc: torch.dtype, channels_per_group: int = 1, steps: Optional[Tensor] = None):
    """Partial (count, mean, M2) of shifted values, each (C * pieces * splits,), and the
    shift of each statistic, (C * pieces / channels_per_group,). ``steps``
    (num_batches_tracked, or None) is incremented by the same kernel: the op's first mutation,
    after every check."""
    size = p.C * p.pieces * p.splits
    parts = tuple(new(size, acc, p.x.device) for _ in range(3))
    shift = new(p.C * p.pieces // channels_per_group, acc, p.x.device)
    if _launches(p.x):
        launch(wrap_triton(segment_stats_kernel), p.grid, p.x, *parts, shift, steps, p.C, p.pieces,
               channels_per_group, *p.launch_args(), COUNT_STEP=steps is not None, **p.meta())
    elif steps is not None:  # traced with fake tensors under the interpreter: the same mutation
        steps.add_(1)
    return parts + (shift,)


def _finalize_args(p: Plan, num_stats: int, parts_per_stat: int, count: int, momentum: Optional[float],
                   update: bool):
    """Grid, compile-time arguments and the scalars every forward finalize kernel takes after
    its tensors."""
    block_k, block_p = small_blocks(num_stats, parts_per_stat, p.x.device)
    meta = dict(UPDATE_RUNNING=update, CUMULATIVE=update and momentum is None, BLOCK_K=block_k,
                BLOCK_P=block_p)
    scalars = (num_stats, parts_per_stat, 0.0 if momentum is None else momentum,
               count / max(count - 1, 1), 1.0 / count)
    return (cdiv(num_stats, block_k),), meta, scalars


def _counted(num_batches_tracked: Optional[Tensor], update: bool) -> Optional[Tensor]:
    """The step counter the stats kernel increments: num_batches_tracked in a training call."""
    return num_batches_tracked if update else None


def _running(t: Optional[Tensor], used: bool) -> Optional[Tensor]:
    """``t`` where the kernel reads it, else None (one compiled variant fewer to build)."""
    return t if used else None


# ---------------------------------------------------------------------------------------
# Statistics ops
# ---------------------------------------------------------------------------------------

_STATE = {"running_mean", "running_var", "num_batches_tracked"}


@_define_op(f"{_NS}::triton_stoch_norm_stats", mutates_args=_STATE)
def stoch_norm_stats(
    input: Tensor, running_mean: Tensor, running_var: Tensor, mask: Tensor, momentum: Optional[float],
    num_batches_tracked: Optional[Tensor], update_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Training StochNorm: (centre, var, red) per channel, from the batch or the pre-update
    running statistics as ``mask`` says; then the running update."""
    op, x, C = "triton_stoch_norm_stats", input, input.shape[1]
    if running_mean is None:
        _fail(op, "StochNorm needs running statistics")
    _check_stats_call(op, x, C, running_mean, running_var, momentum, num_batches_tracked, update_stats)
    _check_table(mask, "mask", (C,), x, op, floating=False)
    if mask.dtype != torch.bool:
        _fail(op, f"mask must be a bool tensor, got {mask.dtype}")
    acc = accumulate_dtype(x)
    p = plan(x, 1)
    parts = _segment_stats(p, acc, steps=_counted(num_batches_tracked, update_stats))
    center, var, red = (new(C, acc, x.device) for _ in range(3))
    grid, meta, scalars = _finalize_args(p, C, p.splits, x.numel() // C, momentum, update_stats)
    if _launches(x):
        launch(wrap_triton(stoch_norm_finalize_kernel), grid, *parts, mask, center, var,
               red, running_mean, running_var, _running(num_batches_tracked, meta["CUMULATIVE"]), *scalars, **meta)
    return center, var, red


@_define_op(f"{_NS}::triton_batch_group_norm_stats", mutates_args=_STATE)
def batch_group_norm_stats(
    input: Tensor, num_groups: int, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    momentum: Optional[float], num_batches_tracked: Optional[Tensor], update_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """BGN (and BatchNorm, G = C) batch statistics: (centre, var, red) per group; the running
    update when ``update_stats`` and running statistics are given."""
    op, x, C = "triton_batch_group_norm_stats", input, input.shape[1]
    if not (num_groups >= 1 and (C % num_groups == 0 or (num_groups % C == 0 and
                                                         math.prod(x.shape[2:]) % (num_groups // C) == 0))):
        _fail(op, f"{num_groups} groups do not fit an input of shape {tuple(x.shape)}")
    _check_stats_call(op, x, num_groups, running_mean, running_var, momentum, num_batches_tracked, update_stats)
    pieces, channels_per_group = grouping(C, num_groups)
    acc = accumulate_dtype(x)
    p = plan(x, pieces)
    parts = _segment_stats(p, acc, channels_per_group, _counted(num_batches_tracked, update_stats))
    center, var, red = (new(num_groups, acc, x.device) for _ in range(3))
    update = update_stats and running_mean is not None
    grid, meta, scalars = _finalize_args(p, num_groups, channels_per_group * p.splits,
                                         x.numel() // num_groups, momentum, update)
    if _launches(x):
        launch(wrap_triton(batch_stats_finalize_kernel), grid, *parts, center, var, red,
               _running(running_mean, update), _running(running_var, update),
               _running(num_batches_tracked, meta["CUMULATIVE"]), *scalars, **meta)
    return center, var, red


@_define_op(f"{_NS}::triton_cross_iteration_norm_stats", mutates_args=_STATE)
def cross_iteration_norm_stats(
    input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
    past_mean: Tensor, past_var: Tensor, past_keep: Tensor, momentum: Optional[float],
    num_batches_tracked: Optional[Tensor], update_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CBN: (mu_t, var_t, centre, var, red) per channel, the current statistics pooled with
    the kept past entries; the running statistics follow the current batch (mu_t, var_t)."""
    op, x, C = "triton_cross_iteration_norm_stats", input, input.shape[1]
    _check_stats_call(op, x, C, running_mean, running_var, momentum, num_batches_tracked, update_stats)
    K = past_mean.shape[0] if past_mean.dim() == 2 else -1
    for name, t in (("past_mean", past_mean), ("past_var", past_var), ("past_keep", past_keep)):
        _check_table(t, name, (K, C), x, op, floating=name != "past_keep")
    acc = accumulate_dtype(x)
    p = plan(x, 1)
    parts = _segment_stats(p, acc, steps=_counted(num_batches_tracked, update_stats))
    mu_t, var_t, center, var, red = (new(C, acc, x.device) for _ in range(5))
    past = (past_mean.to(acc).contiguous(), past_var.to(acc).contiguous(),
            past_keep.to(torch.bool).contiguous())
    update = update_stats and running_mean is not None
    grid, meta, scalars = _finalize_args(p, C, p.splits, x.numel() // C, momentum, update)
    if _launches(x):
        launch(wrap_triton(cross_iteration_finalize_kernel), grid, *parts, *past, K,
               mu_t, var_t, center, var, red, _running(running_mean, update), _running(running_var, update),
               _running(num_batches_tracked, meta["CUMULATIVE"]), *scalars, **meta)
    return mu_t, var_t, center, var, red


# ---------------------------------------------------------------------------------------
# Apply and its backward: shared by the three layers
# ---------------------------------------------------------------------------------------

@_define_op(f"{_NS}::triton_norm_apply", mutates_args=())
def norm_apply(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], center: Tensor, var: Tensor,
    red: Optional[Tensor], num_groups: int, eps: float,
) -> Tensor:
    """y = (x - centre_s) * weight_c / sqrt(var_s + eps) + bias_c, in x's dtype and memory
    format. ``red`` (per statistic; None: constant statistics, as in eval) only matters to
    the backward. Nothing here can fail for what a statistics op returned on validated
    input: the running-statistics update before it is never left half done."""
    _check_apply_call("triton_norm_apply", input, weight, center, var, red, num_groups, bias)
    pieces, channels_per_group = grouping(input.shape[1], num_groups)
    p = plan(input, pieces)
    y = poison(torch.empty_like(p.x))
    if _launches(input):
        launch(wrap_triton(norm_apply_kernel), p.grid, p.x, y, center, var, weight, bias, eps,
               p.C, p.pieces, channels_per_group, *p.launch_args(),
               HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **p.meta())
    return y


@_define_op(f"{_NS}::triton_norm_backward", mutates_args=())
def norm_backward(
    grad_output: Tensor, input: Tensor, weight: Optional[Tensor], center: Tensor, var: Tensor,
    red: Optional[Tensor], num_groups: int, eps: float, output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of triton_norm_apply, including the path through the statistics (``red``):
    (grad_input, grad_weight, grad_bias) as ``output_mask`` asks, an unrequested one
    zero-size; parameter gradients in the weight's dtype (the statistics' without weight).
    Launches: reduce + finalize when a reduction is needed (parameter gradients, or
    grad_input with ``red``), then apply when grad_input is asked for."""
    _check_apply_call("triton_norm_backward", input, weight, center, var, red, num_groups)
    if not (grad_output.shape == input.shape and len(output_mask) == 3):
        _fail("triton_norm_backward",
              f"grad_output of shape {tuple(grad_output.shape)} for an input of shape {tuple(input.shape)}, "
              f"output_mask of {len(output_mask)} values (3 expected)")
    x, C = input, input.shape[1]
    need_x, need_w, need_b = (bool(v) for v in output_mask)
    pieces, channels_per_group = grouping(C, num_groups)
    p = plan(x, pieces)
    acc = center.dtype
    param_dtype = weight.dtype if weight is not None else acc
    dy = grad_output.contiguous(memory_format=p.memory_format)
    param_grads, has_red = need_w or need_b, need_x and red is not None
    dweight = new(C if param_grads else 0, param_dtype, x.device)
    dbias = new(C if param_grads else 0, param_dtype, x.device)
    k_x = k_0 = None
    if param_grads or has_red:
        size = C * pieces * p.splits
        part_dy, part_dyxc = new(size, acc, x.device), new(size, acc, x.device)
        if has_red:
            k_x, k_0 = new(num_groups, acc, x.device), new(num_groups, acc, x.device)
        grid, blocks = grad_finalize_blocks(C, num_groups, pieces, channels_per_group, p.splits, x.device,
                                            stats_half=has_red, channel_half=param_grads)
        if _launches(x):
            launch(wrap_triton(grad_reduce_kernel), p.grid, dy, p.x, center, part_dy, part_dyxc,
                   C, pieces, channels_per_group, *p.launch_args(), **p.meta())
            launch(wrap_triton(grad_finalize_kernel), grid, part_dy, part_dyxc, weight, var, red, eps,
                   k_x, k_0, dweight, dbias, C, num_groups, pieces, channels_per_group, p.splits,
                   HAS_WEIGHT=weight is not None, HAS_RED=has_red, PARAM_GRADS=param_grads, **blocks)
    dx = poison(torch.empty_like(p.x)) if need_x else x.new_empty(0)
    if need_x and _launches(x):
        launch(wrap_triton(grad_apply_kernel), p.grid, dy, p.x, dx, center, var, weight, k_x, k_0, eps,
               C, pieces, channels_per_group, *p.launch_args(),
               HAS_WEIGHT=weight is not None, HAS_REDUCTION=has_red, **p.meta())
    unasked = x.new_empty(0, dtype=param_dtype)
    return dx, (dweight if need_w else unasked), (dbias if need_b else unasked.clone())


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------

def _setup_apply(ctx, inputs, output):
    x, weight, bias, center, var, red, num_groups, eps = inputs
    ctx.save_for_backward(x, weight, center, var, red)
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_apply(ctx, grad_y):
    x, weight, center, var, red = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dweight, dbias = torch.ops.stochnorm_ext.triton_norm_backward(
        grad_y, x, weight, center, var, red, ctx.num_groups, ctx.eps, [need_x, need_w, need_b])
    return ((dx if need_x else None), (dweight if need_w else None),
            (dbias.to(ctx.bias_dtype) if need_b else None), None, None, None, None, None)


def _setup_backward(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "stochnorm_ext (triton backend): double backward is not supported; the normalization "
        "layers have first derivatives only (do not differentiate their gradients, e.g. "
        "create_graph=True followed by another backward)")


torch.library.register_autograd(f"{_NS}::triton_norm_apply", _backward_apply, setup_context=_setup_apply)
torch.library.register_autograd(f"{_NS}::triton_norm_backward", _no_double_backward,
                                setup_context=_setup_backward)
