"""Triton kernels shared by StochNorm, Batch Group Norm and Cross-Iteration BN (forward; the
helpers they share are in tiling.py).

All three layers are batch normalisation with different statistics (docs/DESIGN.md), so the
big, memory-bound passes are written once::

    forward   segment_stats_kernel     x          -> partial (count, mean, M2) per segment and split
              *_finalize_kernel        partials   -> per-statistic centre, variance, reduction
                                                     weight (+ running-statistics update, the
                                                     factor momentum or 1/num_batches_tracked);
                                                     the only per-layer code, a few lines each
              norm_apply_kernel        x          -> y = (x - centre) * gamma * invstd + beta
    backward  (grad_kernels.py)
              grad_reduce_kernel       dy, x      -> partial sum(dy), sum(dy * (x - centre))
              grad_finalize_kernel     partials   -> per-statistic k_x, k_0; d gamma, d beta
              grad_apply_kernel        dy, x      -> dx = gamma*invstd*dy + k_x*(x - centre) + k_0

Data layout. ``x`` of shape (N, C, *S) is read as ``n`` row groups of ``s`` positions of
``C`` channels, either channel-major (NCHW: position is the fastest dim) or channel-minor
(channels_last: the channel is the fastest dim). A *segment* is what one statistic covers
inside one channel: the whole channel, or for BGN with G = m*C one of the ``pieces = m``
contiguous runs of ``piece_len = s / m`` positions. Statistic ``g`` of segment
(c, piece) is ``(c * pieces + piece) // channels_per_group`` (channels_per_group = C/G
for BGN with G | C, else 1), so a statistic's segments are consecutive.

Tiling. Every big kernel walks (positions x channels) tiles of [BLOCK_I, BLOCK_C]; its grid
is (channel blocks * pieces, splits): each channel block's N * cdiv(piece_len, BLOCK_I)
tiles are cut into ``splits`` contiguous ranges, so the reductions fill the GPU even with
few channels. Partial results are stored per (segment, split) and merged (Chan's parallel
formula) by the small finalize kernels.

Numerics. Statistics accumulate on values shifted by one value of their statistic (its
first segment's first value, ``shift``): with a large common offset (1e6 + randn in
float32) every mean and M2 then stays of the data's spread, and merging partials of
several splits, lanes or channels (BGN groups) loses nothing to the offset's rounding. The
shift is added back once, in the finalize kernels. Empty partials never multiply an
overflowed square (0 * inf): huge inputs give an infinite variance, as in BatchNorm, never
NaN.

Accumulation happens in the element type of the statistics buffers the caller passes
(float32, or float64 for float64 input). Float scalars (momentum, eps, ...) are float64
kernel arguments (a plain Python float would reach a compiled kernel as float32), turned
into the accumulation type where they meet a block (``_like``). The lanes' M2 terms are
summed in float64: a float32 sum of a tile's thousands of squares would cost several
float32 roundings of the variance.
Offsets are int64 (tensors over 2**31 elements). No RNG, atomics or libdevice: the kernels
run under TRITON_INTERPRET=1 too.
"""
import triton
import triton.language as tl

from .tiling import _chan_merge, _inv_std, _like, _merge_lanes, _program_tiles, _shift_of, _statistic_of, _tile

# ---------------------------------------------------------------------------------------
# Forward: segment statistics (shared)
# ---------------------------------------------------------------------------------------

@triton.jit
def segment_stats_kernel(
    x_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr, steps_ptr,
    C, pieces, channels_per_group, n, s, piece_len, tiles_per_split,
    COUNT_STEP: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial (count, mean, M2) of each segment over this program's tiles, of the values
    minus their statistic's shift (``_shift_of``; split 0 stores it per statistic).

    Each lane runs Welford's update over the tiles it sees; the lanes are then merged by
    the parallel (Chan) formula. Output index: (channel * pieces + piece) * splits + split.
    With COUNT_STEP, program (0, 0) also counts the step: num_batches_tracked += 1 (no program
    of this launch reads it; the finalize kernel after it reads the new count).
    """
    if COUNT_STEP:
        tl.atomic_add(steps_ptr, 1, mask=(tl.program_id(0) == 0) & (tl.program_id(1) == 0))
    ACC = part_mean_ptr.dtype.element_ty
    channels, channel_mask, piece, i_blocks, first, last = _program_tiles(
        C, pieces, n, piece_len, tiles_per_split, BLOCK_I, BLOCK_C)
    shift = _shift_of(x_ptr, channels, channel_mask, piece, pieces, channels_per_group, C, s,
                      piece_len, CHANNELS_LAST).to(ACC)
    segment = channels * pieces + piece
    tl.store(shift_ptr + segment // channels_per_group, shift,
             mask=channel_mask & (segment % channels_per_group == 0) & (tl.program_id(1) == 0))
    count = tl.zeros([BLOCK_I, BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_I, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_I, BLOCK_C], dtype=ACC)
    for tile in range(first, last):
        offsets, mask = _tile(tile, i_blocks, piece, channels, channel_mask, C, s, piece_len,
                              CHANNELS_LAST, BLOCK_I)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - shift[None, :]
        count += mask.to(ACC)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    count, mean, m2 = _merge_lanes(count, mean, m2, 0)
    out = segment * tl.num_programs(1) + tl.program_id(1)
    tl.store(part_count_ptr + out, count, mask=channel_mask)
    tl.store(part_mean_ptr + out, mean, mask=channel_mask)
    tl.store(part_m2_ptr + out, m2, mask=channel_mask)


@triton.jit
def _merge_partials(part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr, stat, stat_mask,
                    parts_per_stat, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """(count, mean, biased var) of statistics ``stat`` [BLOCK_K], each merged from its
    ``parts_per_stat`` consecutive partials (of shifted values: the shift is added back)."""
    ACC = part_mean_ptr.dtype.element_ty
    count = tl.zeros([BLOCK_K], dtype=ACC)
    mean = tl.zeros([BLOCK_K], dtype=ACC)
    m2 = tl.zeros([BLOCK_K], dtype=ACC)
    base = stat.to(tl.int64) * parts_per_stat
    for p0 in range(0, parts_per_stat, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = stat_mask[:, None] & (p < parts_per_stat)[None, :]
        index = base[:, None] + p[None, :]
        chunk_count, chunk_mean, chunk_m2 = _merge_lanes(
            tl.load(part_count_ptr + index, mask=mask, other=0.0),
            tl.load(part_mean_ptr + index, mask=mask, other=0.0),
            tl.load(part_m2_ptr + index, mask=mask, other=0.0), 1)
        count, mean, m2 = _chan_merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    mean += tl.load(shift_ptr + stat, mask=stat_mask, other=0.0)
    return count, mean, m2 / tl.maximum(count, 1.0)


@triton.jit
def _update_running(running_mean_ptr, running_var_ptr, steps_ptr, stat, stat_mask, old_mean, old_var,
                    batch_mean, batch_var, momentum, unbias, CUMULATIVE: tl.constexpr):
    """EMA like nn.BatchNorm: the running variance takes the unbiased batch variance. The
    factor is ``momentum``, or with CUMULATIVE (momentum=None) 1/num_batches_tracked read
    from the step counter, which the op's stats kernel incremented (no host sync)."""
    if CUMULATIVE:
        take = tl.zeros_like(old_mean) + 1.0 / tl.load(steps_ptr).to(old_mean.dtype)
        keep = 1.0 - take
    else:
        keep, take = _like(1.0 - momentum, old_mean), _like(momentum, old_mean)
    new_mean = keep * old_mean + take * batch_mean
    new_var = keep * old_var + take * (batch_var * _like(unbias, batch_var))
    tl.store(running_mean_ptr + stat, new_mean.to(running_mean_ptr.dtype.element_ty), mask=stat_mask)
    tl.store(running_var_ptr + stat, new_var.to(running_var_ptr.dtype.element_ty), mask=stat_mask)


@triton.jit
def _load_running(running_mean_ptr, running_var_ptr, stat, stat_mask, like):
    """The running statistics before this step's update, in ``like``'s dtype (masked-off
    lanes read mean 0, variance 1, and are never stored)."""
    old_mean = tl.load(running_mean_ptr + stat, mask=stat_mask, other=0.0).to(like.dtype)
    old_var = tl.load(running_var_ptr + stat, mask=stat_mask, other=1.0).to(like.dtype)
    return old_mean, old_var


@triton.jit
def _store_tables(center_ptr, var_ptr, red_weight_ptr, stat, stat_mask, center, var, red_weight):
    """The normalisation tables the apply and backward kernels read, per statistic."""
    tl.store(center_ptr + stat, center, mask=stat_mask)
    tl.store(var_ptr + stat, var, mask=stat_mask)
    tl.store(red_weight_ptr + stat, red_weight, mask=stat_mask)


# ---------------------------------------------------------------------------------------
# Forward: per-layer coefficient math (tiny kernels, one program per BLOCK_K statistics)
# ---------------------------------------------------------------------------------------

@triton.jit
def batch_stats_finalize_kernel(
    part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr,
    center_ptr, var_ptr, red_weight_ptr, running_mean_ptr, running_var_ptr, steps_ptr,
    num_stats, parts_per_stat, momentum: tl.float64, unbias: tl.float64, inv_count: tl.float64,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """BatchNorm / BGN: normalise with this batch's statistic (one per group).

    centre = mean, var = biased variance, reduction weight = 1/M (every element of the
    statistic feeds back into dx). Running statistics get the EMA update when asked.
    """
    stat = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    stat_mask = stat < num_stats
    _, mean, var = _merge_partials(part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr, stat, stat_mask,
                                   parts_per_stat, BLOCK_K, BLOCK_P)
    _store_tables(center_ptr, var_ptr, red_weight_ptr, stat, stat_mask, mean, var, _like(inv_count, mean))
    if UPDATE_RUNNING:
        old_mean, old_var = _load_running(running_mean_ptr, running_var_ptr, stat, stat_mask, mean)
        _update_running(running_mean_ptr, running_var_ptr, steps_ptr, stat, stat_mask, old_mean, old_var,
                        mean, var, momentum, unbias, CUMULATIVE)


@triton.jit
def stoch_norm_finalize_kernel(
    part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr, mask_ptr,
    center_ptr, var_ptr, red_weight_ptr, running_mean_ptr, running_var_ptr, steps_ptr,
    num_stats, parts_per_stat, momentum: tl.float64, unbias: tl.float64, inv_count: tl.float64,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """StochNorm: channel c uses the batch statistics where mask[c], else the running
    statistics as they were *before* this step's update (read before they are written).

    Moving-branch channels treat their statistics as constants: reduction weight 0, so
    their dx is gamma * invstd * dy. The running statistics are updated from the batch
    statistics whatever the mask.
    """
    stat = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    stat_mask = stat < num_stats
    _, mean, var = _merge_partials(part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr, stat, stat_mask,
                                   parts_per_stat, BLOCK_K, BLOCK_P)
    batch_branch = tl.load(mask_ptr + stat, mask=stat_mask, other=0) != 0
    old_mean, old_var = _load_running(running_mean_ptr, running_var_ptr, stat, stat_mask, mean)
    _store_tables(center_ptr, var_ptr, red_weight_ptr, stat, stat_mask, tl.where(batch_branch, mean, old_mean),
                  tl.where(batch_branch, var, old_var), tl.where(batch_branch, _like(inv_count, mean), 0.0))
    if UPDATE_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, steps_ptr, stat, stat_mask, old_mean, old_var,
                        mean, var, momentum, unbias, CUMULATIVE)


@triton.jit
def cross_iteration_finalize_kernel(
    part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr,
    past_mean_ptr, past_var_ptr, past_keep_ptr, num_past,
    mu_t_ptr, var_t_ptr, center_ptr, var_ptr, red_weight_ptr, running_mean_ptr, running_var_ptr, steps_ptr,
    num_stats, parts_per_stat, momentum: tl.float64, unbias: tl.float64, inv_count: tl.float64,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """CBN: the current statistics (mu_t, var_t) averaged with the kept compensated past
    entries (K, C). With count_c = 1 + kept entries::

        mu  = (mu_t + sum mu') / count_c
        var = (var_t + sum var' + sum over entries (current included) of (mu_e - mu)^2) / count_c

    Past entries are constants, so dx's reduction terms are divided by count_c * M:
    reduction weight 1 / (count_c * M). Running statistics follow the current batch only.
    """
    stat = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    stat_mask = stat < num_stats
    _, mu_t, var_t = _merge_partials(part_count_ptr, part_mean_ptr, part_m2_ptr, shift_ptr, stat, stat_mask,
                                     parts_per_stat, BLOCK_K, BLOCK_P)
    count = tl.zeros_like(mu_t) + 1.0
    mean_sum = mu_t
    var_sum = var_t
    for k in range(0, num_past):
        keep = tl.load(past_keep_ptr + k * num_stats + stat, mask=stat_mask, other=0) != 0
        count += tl.where(keep, 1.0, 0.0)
        mean_sum += tl.where(keep, tl.load(past_mean_ptr + k * num_stats + stat, mask=keep, other=0.0), 0.0)
        var_sum += tl.where(keep, tl.load(past_var_ptr + k * num_stats + stat, mask=keep, other=0.0), 0.0)
    mu = mean_sum / count
    spread = (mu_t - mu) * (mu_t - mu)
    for k in range(0, num_past):
        keep = tl.load(past_keep_ptr + k * num_stats + stat, mask=stat_mask, other=0) != 0
        d = tl.load(past_mean_ptr + k * num_stats + stat, mask=keep, other=0.0) - mu
        spread += tl.where(keep, d * d, 0.0)
    tl.store(mu_t_ptr + stat, mu_t, mask=stat_mask)
    tl.store(var_t_ptr + stat, var_t, mask=stat_mask)
    _store_tables(center_ptr, var_ptr, red_weight_ptr, stat, stat_mask, mu, (var_sum + spread) / count,
                  _like(inv_count, count) / count)
    if UPDATE_RUNNING:
        old_mean, old_var = _load_running(running_mean_ptr, running_var_ptr, stat, stat_mask, mu_t)
        _update_running(running_mean_ptr, running_var_ptr, steps_ptr, stat, stat_mask, old_mean, old_var,
                        mu_t, var_t, momentum, unbias, CUMULATIVE)


# ---------------------------------------------------------------------------------------
# Forward: apply (shared)
# ---------------------------------------------------------------------------------------

@triton.jit
def norm_apply_kernel(
    x_ptr, y_ptr, center_ptr, var_ptr, weight_ptr, bias_ptr, eps: tl.float64,
    C, pieces, channels_per_group, n, s, piece_len, tiles_per_split,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = (x - centre) * scale + shift, scale = gamma_c * invstd_g, shift = beta_c.

    The centred form keeps large-offset data accurate (x - centre is exact-ish; a folded
    a*x + b would cancel). centre/var are per statistic, gamma/beta per channel.
    """
    ACC = center_ptr.dtype.element_ty
    channels, channel_mask, piece, i_blocks, first, last = _program_tiles(
        C, pieces, n, piece_len, tiles_per_split, BLOCK_I, BLOCK_C)
    stat = _statistic_of(channels, piece, pieces, channels_per_group)
    center = tl.load(center_ptr + stat, mask=channel_mask, other=0.0)
    scale = _inv_std(tl.load(var_ptr + stat, mask=channel_mask, other=1.0), eps)
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(ACC)
    shift = tl.zeros_like(center)
    if HAS_BIAS:
        shift += tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(ACC)
    for tile in range(first, last):
        offsets, mask = _tile(tile, i_blocks, piece, channels, channel_mask, C, s, piece_len,
                              CHANNELS_LAST, BLOCK_I)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
        y = (x - center[None, :]) * scale[None, :] + shift[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
