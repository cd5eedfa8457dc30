"""Triton helpers shared by the kernels (kernels.py, grad_kernels.py): the tiling of an
input into [BLOCK_I, BLOCK_C] tiles and segments, and the (count, mean, M2) merges (Welford
within a lane, Chan across lanes, splits and a group's segments). See kernels.py's docstring
for the layout, tiling and numerics they implement.
"""
import triton
import triton.language as tl

@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries. Stable for data with a
    large common offset (only differences of means are squared); an empty summary
    (count 0) is neutral, also when the square of the means' difference overflows."""
    count = count_a + count_b
    frac_b = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    spread = tl.where(count_a * frac_b > 0, delta * delta * count_a * frac_b, 0.0)
    return count, mean_a + delta * frac_b, m2_a + m2_b + spread


@triton.jit
def _merge_lanes(count, mean, m2, AXIS: tl.constexpr):
    """Merge the (count, mean, M2) lanes of a tile along AXIS in one step: the exact
    parallel formula, shifted by one lane's mean (``ref``) so that data with a large common
    offset keeps its digits: mean = ref + sum(n_l (mean_l - ref)) / n,
    M2 = sum(M2_l + n_l (mean_l - mean)^2). Empty lanes (count 0) drop out, even where
    their (mean_l - mean)^2 overflows. Plain sums rather than tl.reduce with a combiner:
    the interpreter runs those element by element."""
    total = tl.sum(count, AXIS)
    ref = tl.max(tl.where(count > 0, mean, float("-inf")), AXIS)
    ref = tl.where(total > 0, ref, 0.0)
    merged_mean = ref + tl.sum(count * (mean - tl.expand_dims(ref, AXIS)), AXIS) / tl.maximum(total, 1.0)
    d = mean - tl.expand_dims(merged_mean, AXIS)
    m2_terms = tl.where(count > 0, m2 + count * d * d, 0.0).to(tl.float64)
    return total, merged_mean, tl.sum(m2_terms, AXIS).to(m2.dtype)


@triton.jit
def _like(value, like):
    """A float scalar argument as a block of ``like``'s shape and dtype. Compiled, the
    argument is a float64 tensor, which would promote a float32 block to float64; under
    the interpreter it is a Python float, which takes the block's dtype."""
    return (tl.zeros_like(like) + value).to(like.dtype)


@triton.jit
def _inv_std(var, eps):
    # 1/sqrt rather than rsqrt: the same code serves float32 and float64 statistics.
    return 1.0 / tl.sqrt(var + _like(eps, var))


@triton.jit
def _program_tiles(C, pieces, n, piece_len, tiles_per_split,
                   BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's channels, piece and range [first, last) of tiles.

    Grid: (channel blocks * pieces, splits). Tile t is row group t // i_blocks,
    position block t % i_blocks.
    """
    c_block = tl.program_id(0) // pieces
    piece = tl.program_id(0) % pieces
    channels = c_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_blocks = tl.cdiv(piece_len, BLOCK_I)
    first = tl.program_id(1).to(tl.int64) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, i_blocks * n)
    return channels, channels < C, piece, i_blocks, first, last


@triton.jit
def _tile(tile, i_blocks, piece, channels, channel_mask, C, s, piece_len,
          CHANNELS_LAST: tl.constexpr, BLOCK_I: tl.constexpr):
    """Element offsets (int64) and mask of one [BLOCK_I, BLOCK_C] tile.

    The unit stride is spelled out per layout so the compiler sees which tile dimension is
    contiguous in memory and vectorises along it (positions for NCHW, channels for
    channels_last).
    """
    row_group = tile // i_blocks
    i = (tile % i_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    position = piece * piece_len + i
    if CHANNELS_LAST:
        offsets = (row_group * s + position)[:, None] * C + channels[None, :]
    else:
        offsets = (row_group * C + channels[None, :]) * s + position[:, None]
    return offsets, (i < piece_len)[:, None] & channel_mask[None, :]


@triton.jit
def _statistic_of(channels, piece, pieces, channels_per_group):
    """Index of the statistic (group) that segment (channel, piece) belongs to."""
    return (channels * pieces + piece) // channels_per_group


@triton.jit
def _shift_of(x_ptr, channels, channel_mask, piece, pieces, channels_per_group, C, s, piece_len,
              CHANNELS_LAST: tl.constexpr):
    """The shift of each channel's statistic: the first value (row group 0, first position)
    of the statistic's first segment, so that every segment of a statistic shares it."""
    first = (channels * pieces + piece) // channels_per_group * channels_per_group
    channel = first // pieces
    position = first % pieces * piece_len
    if CHANNELS_LAST:
        offsets = position * C + channel
    else:
        offsets = channel * s + position
    return tl.load(x_ptr + offsets, mask=channel_mask, other=0.0)
