"""The ``triton`` backend: the three layers on the shared Triton kernels.

Kernels live in ``stochnorm_ext.triton_kernels.norm_kernels`` (see its docstring for the
design). They are registered as PyTorch ops with ``torch.library.triton_op`` (so
``torch.compile`` sees the kernels; under TRITON_INTERPRET=1 as opaque ``custom_op``s,
see ``_define_op``):

    stochnorm_ext::triton_stoch_norm_stats        stats -> StochNorm finalize      (mutates running stats)
    stochnorm_ext::triton_batch_group_stats       stats -> batch-stats finalize    (mutates running stats)
    stochnorm_ext::triton_cross_iteration_stats   stats -> CBN finalize            (mutates running stats)
    stochnorm_ext::triton_norm_apply              apply, shared; autograd -> triton_norm_bwd
    stochnorm_ext::triton_norm_bwd                reduce -> finalize -> apply, shared; its own
                                                  autograd formula raises (no double backward)

A statistics op returns per statistic (centre, variance, reduction weight); it is not
differentiable (it takes x detached, and PyTorch allows no autograd formula on an op that
mutates its inputs). The dependence of the statistics on x is folded into the apply op's
backward through the reduction weight (1/M, mask/M or 1/(count_c M)), so the gradient is
exact. Statistics and apply stay separate ops, as docs/DESIGN.md asks (a distributed version
would all-reduce between them).

Dtypes: float32/float16/bfloat16 inputs accumulate in float32; float64 inputs run the
same kernels in float64, exact to float64 rounding (``momentum``, ``eps`` and the other
float scalars are float64 kernel arguments).

No autotuning: launch configurations come from a shape heuristic (``_plan``), identical
under the interpreter and on a GPU, so no kernel ever runs twice on the same state.

Without Triton (or with a torch older than 2.6) the module still imports and sets
``UNAVAILABLE`` to the reason.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

UNAVAILABLE: Optional[str] = None
try:
    import triton  # noqa: F401
except ImportError as exc:  # the package must import without triton
    UNAVAILABLE = f"triton is not installed ({exc})"
else:
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        UNAVAILABLE = f"the triton backend needs torch >= 2.6 (torch.library.triton_op), found {torch.__version__}"

POISON_ENV = "STOCHNORM_EXT_POISON_OUTPUTS"
_NS = "stochnorm_ext"

# Launch heuristics (see _plan). Tests shrink "tile" to exercise multi-tile loops, several
# channel blocks and split reductions on small shapes.
TUNING = {
    "tile": None,             # elements per [BLOCK_I, BLOCK_C] tile; None: 1024 GPU, 4096 interpreter
    "max_block_c": None,      # widest channel block (channels_last); None: 128 GPU, 1024 interpreter
    "programs": None,         # programs a big kernel aims for; None: 8 per SM, 2 interpreter
    "num_warps": 4,
}


# ---------------------------------------------------------------------------------------
# Host-side planning (plain Python: no Triton needed, unit-testable)
# ---------------------------------------------------------------------------------------

def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_along_positions(length: int, tile: int) -> int:
    """BLOCK_I for NCHW (positions contiguous). A channel row that fits in a tile is taken
    whole (several channels per tile); a longer one is cut into the largest power-of-two
    blocks that waste at most 1/16 of the lanes on the last block (3136 = 56x56 -> 128)."""
    if length <= tile:
        return _next_pow2(length)
    best, best_waste = tile, 1.0
    block = tile
    while block >= min(128, tile):
        waste = (_cdiv(length, block) * block - length) / length
        if waste <= 1 / 16:
            return block
        if waste < best_waste:
            best, best_waste = block, waste
        block //= 2
    return best


class Plan(NamedTuple):
    """How the big kernels walk x (see norm_kernels' docstring)."""
    x: Tensor                    # x as the kernels read it: dense in its own memory format
    memory_format: torch.memory_format
    channels_last: bool          # channel is the fastest dim in memory
    C: int
    pieces: int                  # segments per channel (BGN with G = pieces * C), else 1
    n: int                       # row groups
    s: int                       # positions per row group
    piece_len: int               # positions per segment and row group
    block_i: int
    block_c: int
    splits: int                  # programs sharing one channel block's tiles
    tiles_per_split: int

    @property
    def grid(self):
        return (_cdiv(self.C, self.block_c) * self.pieces, self.splits)

    def launch_args(self):
        """Arguments shared by the big kernels, after their tensors."""
        return (self.n, self.s, self.piece_len, self.tiles_per_split)


_SM_COUNT = {}


def _target_programs(device: torch.device) -> int:
    if TUNING["programs"] is not None:
        return TUNING["programs"]
    if device.type != "cuda":
        return 2  # interpreter: cost grows with programs; 2 still exercises the split merge
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 8 * _SM_COUNT[index]


def dense_layout(x: Tensor) -> Tuple[Tensor, torch.memory_format]:
    """x itself when it is dense in the contiguous or channels_last(_3d) format, else a
    contiguous copy; and that format (the output keeps it, like the reference)."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if x.is_contiguous():
        return x, torch.contiguous_format
    if cl is not None and x.is_contiguous(memory_format=cl):
        return x, cl
    return x.contiguous(), torch.contiguous_format


def plan_for_shape(shape, memory_format: torch.memory_format, pieces: int, device: torch.device,
                   x: Optional[Tensor] = None) -> Plan:
    """The tiling and grid for an input of ``shape`` stored in ``memory_format``."""
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    interp = device.type != "cuda"
    tile = TUNING["tile"] or (4096 if interp else 1024)
    # S == 1 (e.g. (N, C) input): a contiguous tensor is already channel-minor.
    channels_last = memory_format != torch.contiguous_format or S == 1
    if channels_last and pieces == 1:
        n, s = 1, N * S          # rows of consecutive samples are adjacent: one long run
    else:
        n, s = N, S
    piece_len = s // pieces
    if channels_last:
        block_c = min(_next_pow2(C), TUNING["max_block_c"] or (1024 if interp else 128), tile)
        block_i = max(1, min(tile // block_c, _next_pow2(piece_len)))
    else:
        block_i = _block_along_positions(piece_len, tile)
        block_c = max(1, min(_next_pow2(C), tile // block_i))
    tiles = n * _cdiv(piece_len, block_i)
    per_split = _cdiv(C, block_c) * pieces
    splits = max(1, min(tiles, 65535, _cdiv(_target_programs(device), per_split)))
    tiles_per_split = _cdiv(tiles, splits)
    splits = _cdiv(tiles, tiles_per_split)  # no empty programs
    return Plan(x, memory_format, channels_last, C, pieces, n, s, piece_len, block_i, block_c,
                splits, tiles_per_split)


def _plan(x: Tensor, pieces: int) -> Plan:
    x, fmt = dense_layout(x)
    return plan_for_shape(tuple(x.shape), fmt, pieces, x.device, x)


def _small_blocks(num: int, parts: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_K, BLOCK_P) of the finalize kernels: BLOCK_K statistics per program, their
    partials read BLOCK_P at a time."""
    block_p = min(_next_pow2(parts), 64)
    if device.type != "cuda":  # interpreter: one program, few loop trips
        return min(_next_pow2(num), 1024), min(_next_pow2(parts), max(1, 16384 // _next_pow2(num)))
    return max(1, min(_next_pow2(num), 4096 // block_p, 128)), block_p


# ---------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------

def _poison(t: Tensor) -> Tensor:
    """NaN-fill a fresh output when STOCHNORM_EXT_POISON_OUTPUTS=1: an element a kernel
    forgets to write then fails every comparison."""
    if os.environ.get(POISON_ENV) == "1":
        t.fill_(float("nan"))
    return t


def _new(size, dtype, device) -> Tensor:
    return _poison(torch.empty(size, dtype=dtype, device=device))


def _accumulate_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------

if UNAVAILABLE is None:
    from torch.library import triton_op, wrap_triton

    from .triton_kernels import norm_kernels as _kernels
    # Module-level names: torch's triton_op finds the kernels of an op (for its compile
    # cache key) by reading the source for wrap_triton(<global name>).
    segment_stats_kernel = _kernels.segment_stats_kernel
    batch_stats_finalize_kernel = _kernels.batch_stats_finalize_kernel
    stoch_norm_finalize_kernel = _kernels.stoch_norm_finalize_kernel
    cross_iteration_finalize_kernel = _kernels.cross_iteration_finalize_kernel
    norm_apply_kernel = _kernels.norm_apply_kernel
    grad_reduce_kernel = _kernels.grad_reduce_kernel
    grad_finalize_kernel = _kernels.grad_finalize_kernel
    grad_apply_kernel = _kernels.grad_apply_kernel
    INTERPRETED = type(segment_stats_kernel).__name__ == "InterpretedFunction"

    def _define_op(name: str, mutates_args):
        """``triton_op`` on a GPU, so torch.compile traces into the kernels.

        Under the interpreter wrap_triton hands the interpreted kernel back unwrapped, so
        a triton_op would run its kernels even while torch.compile or opcheck trace it
        with fake tensors. There the op is a plain (opaque) ``custom_op`` whose fake
        implementation is the same function with the launches skipped (``_launches``).
        """
        def define(fn):
            if not INTERPRETED:
                return triton_op(name, fn, mutates_args=mutates_args)
            op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fn)
            return op
        return define

    def _launches(t: Tensor) -> bool:
        """False while tracing with fake tensors under the interpreter (shapes are all a
        fake implementation needs); always True on a GPU, where wrap_triton traces."""
        return not (INTERPRETED and is_fake(t))

    def _segment_stats(p: Plan, acc: torch.dtype, channels_per_group: int = 1):
        """Partial (count, mean, M2) of shifted values, each (C * pieces * splits,), and the
        shift of each statistic, (C * pieces / channels_per_group,)."""
        size = p.C * p.pieces * p.splits
        parts = tuple(_new(size, acc, p.x.device) for _ in range(3))
        shift = _new(p.C * p.pieces // channels_per_group, acc, p.x.device)
        if _launches(p.x):
            wrap_triton(segment_stats_kernel)[p.grid](
                p.x, *parts, shift, p.C, p.pieces, channels_per_group, *p.launch_args(),
                CHANNELS_LAST=p.channels_last, BLOCK_I=p.block_i, BLOCK_C=p.block_c,
                num_warps=TUNING["num_warps"])
        return parts + (shift,)

    def _apply(p: Plan, center: Tensor, var: Tensor, weight, bias, eps: float,
               channels_per_group: int) -> Tensor:
        y = _poison(torch.empty_like(p.x))
        if _launches(p.x):
            wrap_triton(norm_apply_kernel)[p.grid](
                p.x, y, center, var, weight, bias, eps,
                p.C, p.pieces, channels_per_group, *p.launch_args(),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                CHANNELS_LAST=p.channels_last, BLOCK_I=p.block_i, BLOCK_C=p.block_c,
                num_warps=TUNING["num_warps"])
        return y

    def _finalize_args(p: Plan, num_stats: int, parts_per_stat: int, count: int, momentum: float):
        """Grid, blocks and the scalars every finalize kernel takes after its tensors."""
        block_k, block_p = _small_blocks(num_stats, parts_per_stat, p.x.device)
        scalars = (num_stats, parts_per_stat, momentum, count / max(count - 1, 1), 1.0 / count)
        return (_cdiv(num_stats, block_k),), dict(BLOCK_K=block_k, BLOCK_P=block_p), scalars

    # -- statistics ops: mutate the running statistics, not differentiable ---------------
    # They take x detached: the dependence of the statistics on x is part of
    # triton_norm_apply's backward (through the reduction weight), not a graph edge.

    @_define_op(f"{_NS}::triton_stoch_norm_stats", mutates_args={"running_mean", "running_var"})
    def stoch_norm_stats(
        x: Tensor, running_mean: Tensor, running_var: Tensor, mask: Tensor, momentum: float,
        update_stats: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Training StochNorm: (centre, var, reduction weight) per channel, from the batch
        or the pre-update running statistics as ``mask`` says; then the running update."""
        C = x.shape[1]
        acc = _accumulate_dtype(x)
        p = _plan(x, 1)
        parts = _segment_stats(p, acc)
        center, var, red_weight = (_new(C, acc, x.device) for _ in range(3))
        grid, blocks, scalars = _finalize_args(p, C, p.splits, x.numel() // C, momentum)
        if _launches(x):
            wrap_triton(stoch_norm_finalize_kernel)[grid](
                *parts, mask.view(torch.uint8), center, var, red_weight, running_mean, running_var,
                *scalars, UPDATE_RUNNING=update_stats, **blocks)
        return center, var, red_weight

    @_define_op(f"{_NS}::triton_batch_group_stats", mutates_args={"running_mean", "running_var"})
    def batch_group_stats(
        x: Tensor, num_groups: int, running_mean: Optional[Tensor], running_var: Optional[Tensor],
        momentum: float, update_stats: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """BGN (and BatchNorm, G = C) batch statistics: (centre, var, reduction weight)
        per group; the running update when ``update_stats`` and running stats are given."""
        pieces, channels_per_group = _grouping(x.shape[1], num_groups)
        acc = _accumulate_dtype(x)
        p = _plan(x, pieces)
        parts = _segment_stats(p, acc, channels_per_group)
        center, var, red_weight = (_new(num_groups, acc, x.device) for _ in range(3))
        grid, blocks, scalars = _finalize_args(p, num_groups, channels_per_group * p.splits,
                                               x.numel() // num_groups, momentum)
        update = update_stats and running_mean is not None
        if _launches(x):
            wrap_triton(batch_stats_finalize_kernel)[grid](
                *parts, center, var, red_weight, running_mean if update else None,
                running_var if update else None, *scalars, UPDATE_RUNNING=update, **blocks)
        return center, var, red_weight

    @_define_op(f"{_NS}::triton_cross_iteration_stats", mutates_args={"running_mean", "running_var"})
    def cross_iteration_stats(
        x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
        past_mean: Tensor, past_var: Tensor, past_keep: Tensor, momentum: float,
        update_stats: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """CBN: (mu_t, var_t, centre, var, reduction weight) per channel; the running
        statistics follow the current batch (mu_t, var_t)."""
        C = x.shape[1]
        acc = _accumulate_dtype(x)
        p = _plan(x, 1)
        parts = _segment_stats(p, acc)
        mu_t, var_t, center, var, red_weight = (_new(C, acc, x.device) for _ in range(5))
        grid, blocks, scalars = _finalize_args(p, C, p.splits, x.numel() // C, momentum)
        update = update_stats and running_mean is not None
        if _launches(x):
            wrap_triton(cross_iteration_finalize_kernel)[grid](
                *parts, past_mean.to(acc).contiguous(), past_var.to(acc).contiguous(),
                past_keep.to(torch.bool).contiguous().view(torch.uint8), past_mean.shape[0],
                mu_t, var_t, center, var, red_weight, running_mean if update else None,
                running_var if update else None, *scalars, UPDATE_RUNNING=update, **blocks)
        return mu_t, var_t, center, var, red_weight

    # -- apply and its backward: shared by the three layers ------------------------------

    @_define_op(f"{_NS}::triton_norm_apply", mutates_args=())
    def norm_apply(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], center: Tensor, var: Tensor,
        red_weight: Optional[Tensor], num_groups: int, eps: float,
    ) -> Tensor:
        """y = (x - centre_g) * weight_c / sqrt(var_g + eps) + bias_c, in x's dtype and
        memory format. ``red_weight`` (per statistic; None: the statistics are constants,
        as in eval) only matters to the backward."""
        pieces, channels_per_group = _grouping(x.shape[1], num_groups)
        return _apply(_plan(x, pieces), center, var, weight, bias, eps, channels_per_group)

    @_define_op(f"{_NS}::triton_norm_bwd", mutates_args=())
    def norm_bwd(
        grad_y: Tensor, x: Tensor, weight: Optional[Tensor], center: Tensor, var: Tensor,
        red_weight: Optional[Tensor], num_groups: int, eps: float, param_grads: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Backward of triton_norm_apply, including the path through the statistics:
        (dx, d weight, d bias), the last two in the statistics' dtype (zeros when
        ``param_grads`` is False and nothing needs the reduction pass)."""
        C = x.shape[1]
        pieces, channels_per_group = _grouping(C, num_groups)
        p = _plan(x, pieces)
        acc = center.dtype
        dy = grad_y.contiguous(memory_format=p.memory_format)
        dweight, dbias = _new(C, acc, x.device), _new(C, acc, x.device)
        k_x = k_0 = None
        if red_weight is not None or param_grads:
            size = C * pieces * p.splits
            part_dy, part_dyxc = _new(size, acc, x.device), _new(size, acc, x.device)
            if _launches(x):
                wrap_triton(grad_reduce_kernel)[p.grid](
                    dy, p.x, center, part_dy, part_dyxc,
                    C, pieces, channels_per_group, *p.launch_args(),
                    CHANNELS_LAST=p.channels_last, BLOCK_I=p.block_i, BLOCK_C=p.block_c,
                    num_warps=TUNING["num_warps"])
            k_x, k_0 = _new(num_groups, acc, x.device), _new(num_groups, acc, x.device)
            if red_weight is None:
                red_weight = torch.zeros(num_groups, dtype=acc, device=x.device)
            num = max(C, num_groups)
            block_k, block_p = _small_blocks(num, max(channels_per_group, pieces) * p.splits, x.device)
            if _launches(x):
                wrap_triton(grad_finalize_kernel)[(_cdiv(num, block_k),)](
                    part_dy, part_dyxc, weight, var, red_weight, eps, k_x, k_0, dweight, dbias,
                    C, num_groups, pieces, channels_per_group, p.splits,
                    HAS_WEIGHT=weight is not None, BLOCK_K=block_k, BLOCK_P=block_p)
        else:
            dweight.zero_()
            dbias.zero_()
        dx = _poison(torch.empty_like(p.x))
        has_reduction = k_x is not None and red_weight is not None
        if _launches(x):
            wrap_triton(grad_apply_kernel)[p.grid](
                dy, p.x, dx, center, var, weight, k_x, k_0, eps,
                C, pieces, channels_per_group, *p.launch_args(),
                HAS_WEIGHT=weight is not None, HAS_REDUCTION=has_reduction,
                CHANNELS_LAST=p.channels_last, BLOCK_I=p.block_i, BLOCK_C=p.block_c,
                num_warps=TUNING["num_warps"])
        return dx, dweight, dbias

    # -- autograd ----------------------------------------------------------------------

    def _setup_apply(ctx, inputs, output):
        x, weight, bias, center, var, red_weight, num_groups, eps = inputs
        ctx.save_for_backward(x, weight, center, var, red_weight)
        ctx.num_groups, ctx.eps = num_groups, eps
        ctx.bias_dtype = bias.dtype if bias is not None else None

    def _backward_apply(ctx, grad_y):
        x, weight, center, var, red_weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dweight, dbias = torch.ops.stochnorm_ext.triton_norm_bwd(
            grad_y, x, weight, center, var, red_weight, ctx.num_groups, ctx.eps,
            bool(need_w or need_b))
        dweight = dweight.to(weight.dtype) if need_w else None
        dbias = dbias.to(ctx.bias_dtype) if need_b else None
        return (dx if need_x else None), dweight, dbias, None, None, None, None, None

    def _setup_bwd(ctx, inputs, output):
        pass

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "stochnorm_ext (triton backend): double backward is not supported; the normalization "
            "layers have first derivatives only (do not differentiate their gradients, e.g. "
            "create_graph=True followed by another backward)")

    torch.library.register_autograd(f"{_NS}::triton_norm_apply", _backward_apply,
                                    setup_context=_setup_apply)
    torch.library.register_autograd(f"{_NS}::triton_norm_bwd", _no_double_backward,
                                    setup_context=_setup_bwd)


def _grouping(C: int, num_groups: int) -> Tuple[int, int]:
    """(pieces per channel, channels per group) of BGN's grouping; (1, 1) is BatchNorm."""
    if C % num_groups == 0:
        return 1, C // num_groups
    return num_groups // C, 1


# ---------------------------------------------------------------------------------------
# Backend interface (see _backend.py)
# ---------------------------------------------------------------------------------------

def _constant_stats(running_mean: Tensor, running_var: Tensor, x: Tensor):
    """Eval: the running statistics are the (constant) statistics; no reduction terms."""
    acc = _accumulate_dtype(x)
    return running_mean.detach().to(acc), running_var.detach().to(acc), None


def _untouched_on_failure(running_mean: Optional[Tensor], running_var: Optional[Tensor], step):
    """Run ``step`` (a training step whose statistics op updates the running statistics in
    its finalize kernel, before the apply op runs) so that a failure after the update (the
    apply op, an allocation) leaves the running statistics as they were. Eager only: a
    compiled graph has no partial state to undo (and the copies would cost a graph pass)."""
    if running_mean is None or torch.compiler.is_compiling():
        return step()
    saved = running_mean.clone(), running_var.clone()
    try:
        return step()
    except BaseException:
        with torch.no_grad():
            running_mean.copy_(saved[0])
            running_var.copy_(saved[1])
        raise


def stoch_norm(x, weight, bias, running_mean, running_var, mask, training, momentum, eps,
               update_stats=True, num_batches_tracked=None):
    momentum = _step_factor(momentum, num_batches_tracked)
    x = dense_layout(x)[0]  # once here, not in every op (differentiable copy if strided)
    if not training:
        stats = _constant_stats(running_mean, running_var, x)
        return torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, *stats, x.shape[1], float(eps))

    def step():
        stats = torch.ops.stochnorm_ext.triton_stoch_norm_stats(
            x.detach(), running_mean, running_var, mask, float(momentum), bool(update_stats))
        return torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, *stats, x.shape[1], float(eps))

    return _untouched_on_failure(running_mean if update_stats else None, running_var, step)


def batch_group_norm(x, num_groups, weight, bias, running_mean, running_var, training, momentum,
                     eps, update_stats=True, num_batches_tracked=None):
    momentum = _step_factor(momentum, num_batches_tracked)
    x = dense_layout(x)[0]

    def step():
        if training or running_mean is None:
            stats = torch.ops.stochnorm_ext.triton_batch_group_stats(
                x.detach(), int(num_groups), running_mean, running_var, float(momentum),
                bool(training and update_stats))
        else:
            stats = _constant_stats(running_mean, running_var, x)
        return torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, *stats, int(num_groups), float(eps))

    return _untouched_on_failure(running_mean if training and update_stats else None, running_var, step)


def cross_iteration_norm(x, weight, bias, running_mean, running_var, past_mean, past_var,
                         past_keep, training, momentum, eps, update_stats=True, num_batches_tracked=None):
    momentum = _step_factor(momentum, num_batches_tracked)
    x = dense_layout(x)[0]

    def step():
        if not training and running_mean is not None:
            center, var, red_weight = _constant_stats(running_mean, running_var, x)
            mu_t, var_t = center, var
        else:
            mu_t, var_t, center, var, red_weight = torch.ops.stochnorm_ext.triton_cross_iteration_stats(
                x.detach(), running_mean, running_var, past_mean, past_var, past_keep, float(momentum),
                bool(training and update_stats))
        y = torch.ops.stochnorm_ext.triton_norm_apply(x, weight, bias, center, var, red_weight,
                                                      x.shape[1], float(eps))
        return y, mu_t.detach(), var_t.detach()

    return _untouched_on_failure(running_mean if training and update_stats else None, running_var, step)


def _step_factor(momentum, num_batches_tracked):
    """Interim, until this provider takes num_batches_tracked into its statistics op: count
    the step and resolve momentum=None to the cumulative factor."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    return momentum
