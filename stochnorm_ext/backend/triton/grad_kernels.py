"""Backward kernels shared by the three layers (the forward kernels and the design are in
kernels.py): reduce -> finalize -> apply, from the contract's per-statistic
reduction-weight form (docs/DESIGN.md)::

    grad_reduce_kernel     dy, x     -> partial sum(dy), sum(dy * (x - centre)) per segment and split
    grad_finalize_kernel   partials  -> per-statistic k_x, k_0; per-channel d gamma, d beta
    grad_apply_kernel      dy, x     -> dx = gamma*invstd*dy + k_x*(x - centre) + k_0
"""
import triton
import triton.language as tl

from .tiling import _inv_std, _program_tiles, _statistic_of, _tile


@triton.jit
def grad_reduce_kernel(
    dy_ptr, x_ptr, center_ptr, part_dy_ptr, part_dyxc_ptr,
    C, pieces, channels_per_group, n, s, piece_len, tiles_per_split,
    CHANNELS_LAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial sum(dy) and sum(dy * (x - centre)) of each segment over this program's
    tiles (centred, so large offsets do not cancel). Same output indexing as
    segment_stats_kernel."""
    ACC = center_ptr.dtype.element_ty
    channels, channel_mask, piece, i_blocks, first, last = _program_tiles(
        C, pieces, n, piece_len, tiles_per_split, BLOCK_I, BLOCK_C)
    stat = _statistic_of(channels, piece, pieces, channels_per_group)
    center = tl.load(center_ptr + stat, mask=channel_mask, other=0.0)
    sum_dy = tl.zeros([BLOCK_I, BLOCK_C], dtype=ACC)
    sum_dyxc = tl.zeros([BLOCK_I, BLOCK_C], dtype=ACC)
    for tile in range(first, last):
        offsets, mask = _tile(tile, i_blocks, piece, channels, channel_mask, C, s, piece_len,
                              CHANNELS_LAST, BLOCK_I)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dyxc += tl.where(mask, dy * (x - center[None, :]), 0.0)
    out = (channels * pieces + piece) * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_dy_ptr + out, tl.sum(sum_dy, 0), mask=channel_mask)
    tl.store(part_dyxc_ptr + out, tl.sum(sum_dyxc, 0), mask=channel_mask)


@triton.jit
def grad_finalize_kernel(
    part_dy_ptr, part_dyxc_ptr, weight_ptr, var_ptr, red_weight_ptr, eps: tl.float64,
    k_x_ptr, k_0_ptr, dweight_ptr, dbias_ptr,
    C, num_stats, pieces, channels_per_group, splits,
    HAS_WEIGHT: tl.constexpr, HAS_RED: tl.constexpr, PARAM_GRADS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_PC: tl.constexpr,
):
    """With HAS_RED, per statistic g (w = its reduction weight, r = invstd, xc = x - centre)::

        k_x = -w * r^3 * sum(gamma * dy * xc)     k_0 = -w * r * sum(gamma * dy)

    so that dx = gamma * r * dy + k_x * xc + k_0 is BN's backward with its reduction
    terms weighted by w (1/M for BN/BGN, mask/M for StochNorm, 1/(count_c M) for CBN;
    nothing here assumes xhat averages to zero). With PARAM_GRADS, per channel c::

        d gamma = sum over c's segments of r_g * sum(dy * xc)      d beta = sum(dy)

    stored in the parameter gradients' dtype. Program i handles statistics block i
    ([BLOCK_K, BLOCK_P] at a time) and channel block i ([BLOCK_KC, BLOCK_PC]): a group of
    many channels (BGN, G << C) is reduced across BLOCK_P lanes (plan.small_blocks), never
    by one lane looping over its channels.
    """
    ACC = var_ptr.dtype.element_ty
    if HAS_RED:
        # Statistics: their partials are consecutive, channels_per_group * splits of them.
        block = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        p = tl.arange(0, BLOCK_P)
        stat_mask = block < num_stats
        parts = channels_per_group * splits
        acc_dy = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
        acc_dyxc = tl.zeros([BLOCK_K, BLOCK_P], dtype=ACC)
        for p0 in range(0, parts, BLOCK_P):
            mask = stat_mask[:, None] & ((p0 + p) < parts)[None, :]
            index = block.to(tl.int64)[:, None] * parts + (p0 + p)[None, :]
            dy = tl.load(part_dy_ptr + index, mask=mask, other=0.0)
            dyxc = tl.load(part_dyxc_ptr + index, mask=mask, other=0.0)
            if HAS_WEIGHT:
                gamma = tl.load(weight_ptr + (index // splits) // pieces, mask=mask, other=0.0).to(ACC)
                dy *= gamma
                dyxc *= gamma
            acc_dy += dy
            acc_dyxc += dyxc
        r = _inv_std(tl.load(var_ptr + block, mask=stat_mask, other=1.0), eps)
        w = tl.load(red_weight_ptr + block, mask=stat_mask, other=0.0)
        tl.store(k_x_ptr + block, -w * r * r * r * tl.sum(acc_dyxc, 1), mask=stat_mask)
        tl.store(k_0_ptr + block, -w * r * tl.sum(acc_dy, 1), mask=stat_mask)

    if PARAM_GRADS:
        # Channels: their partials are consecutive too, pieces * splits of them.
        block = tl.program_id(0) * BLOCK_KC + tl.arange(0, BLOCK_KC)
        p = tl.arange(0, BLOCK_PC)
        channel_mask = block < C
        parts = pieces * splits
        acc_dy = tl.zeros([BLOCK_KC, BLOCK_PC], dtype=ACC)
        acc_dyxc = tl.zeros([BLOCK_KC, BLOCK_PC], dtype=ACC)
        for p0 in range(0, parts, BLOCK_PC):
            mask = channel_mask[:, None] & ((p0 + p) < parts)[None, :]
            index = block.to(tl.int64)[:, None] * parts + (p0 + p)[None, :]
            r_seg = _inv_std(tl.load(var_ptr + (index // splits) // channels_per_group, mask=mask, other=1.0), eps)
            acc_dy += tl.load(part_dy_ptr + index, mask=mask, other=0.0)
            acc_dyxc += r_seg * tl.load(part_dyxc_ptr + index, mask=mask, other=0.0)
        tl.store(dbias_ptr + block, tl.sum(acc_dy, 1).to(dbias_ptr.dtype.element_ty), mask=channel_mask)
        tl.store(dweight_ptr + block, tl.sum(acc_dyxc, 1).to(dweight_ptr.dtype.element_ty), mask=channel_mask)


@triton.jit
def grad_apply_kernel(
    dy_ptr, x_ptr, dx_ptr, center_ptr, var_ptr, weight_ptr, k_x_ptr, k_0_ptr, eps: tl.float64,
    C, pieces, channels_per_group, n, s, piece_len, tiles_per_split,
    HAS_WEIGHT: tl.constexpr, HAS_REDUCTION: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = k_dy * dy + k_x * (x - centre) + k_0 with k_dy = gamma_c * invstd_g.
    Without reduction terms (eval: constant statistics) x is not read."""
    ACC = center_ptr.dtype.element_ty
    channels, channel_mask, piece, i_blocks, first, last = _program_tiles(
        C, pieces, n, piece_len, tiles_per_split, BLOCK_I, BLOCK_C)
    stat = _statistic_of(channels, piece, pieces, channels_per_group)
    k_dy = _inv_std(tl.load(var_ptr + stat, mask=channel_mask, other=1.0), eps)
    if HAS_WEIGHT:
        k_dy *= tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(ACC)
    if HAS_REDUCTION:
        center = tl.load(center_ptr + stat, mask=channel_mask, other=0.0)
        k_x = tl.load(k_x_ptr + stat, mask=channel_mask, other=0.0)
        k_0 = tl.load(k_0_ptr + stat, mask=channel_mask, other=0.0)
    for tile in range(first, last):
        offsets, mask = _tile(tile, i_blocks, piece, channels, channel_mask, C, s, piece_len,
                              CHANNELS_LAST, BLOCK_I)
        dx = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC) * k_dy[None, :]
        if HAS_REDUCTION:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
            dx += k_x[None, :] * (x - center[None, :]) + k_0[None, :]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
