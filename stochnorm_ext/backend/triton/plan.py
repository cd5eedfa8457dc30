"""Launch planning of the Triton provider: how the kernels walk an input, and their grids.

Plain Python (no Triton needed, unit-testable). No autotuning: launch configurations come
from a shape heuristic, identical under the interpreter and on a GPU, so no kernel ever runs
twice on the same state (the statistics ops update running statistics in place).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

# Launch heuristics. Tests shrink "tile" to exercise multi-tile loops, several channel blocks
# and split reductions on small shapes.
TUNING = {
    "tile": None,             # elements per [BLOCK_I, BLOCK_C] tile; None: 1024 GPU, 4096 interpreter
    "max_block_c": None,      # widest channel block (channels_last); None: 128 GPU, 1024 interpreter
    "programs": None,         # programs a big kernel aims for; None: 8 per SM, 2 interpreter
    "num_warps": 4,
    "gpu_blocks": None,       # finalize blocks as on a GPU; None: by device (compile_check sets True)
}

# Elements one program of a small (finalize) kernel holds per loop step on a GPU.
FINALIZE_LANES = 4096


def next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grouping(C: int, num_groups: int) -> Tuple[int, int]:
    """(pieces per channel, channels per statistic) of the contract's grouping rule: G | C
    groups whole channels, G = pieces * C cuts each channel; (1, 1) is one statistic per
    channel (StochNorm, CBN, BatchNorm)."""
    if C % num_groups == 0:
        return 1, C // num_groups
    return num_groups // C, 1


def _block_along_positions(length: int, tile: int) -> int:
    """BLOCK_I for NCHW (positions contiguous). A channel row that fits in a tile is taken
    whole (several channels per tile); a longer one is cut into the largest power-of-two
    blocks that waste at most 1/16 of the lanes on the last block (3136 = 56x56 -> 128)."""
    if length <= tile:
        return next_pow2(length)
    best, best_waste = tile, 1.0
    block = tile
    while block >= min(128, tile):
        waste = (cdiv(length, block) * block - length) / length
        if waste <= 1 / 16:
            return block
        if waste < best_waste:
            best, best_waste = block, waste
        block //= 2
    return best


class Plan(NamedTuple):
    """How the big kernels walk x (see kernels.py's docstring)."""
    x: Optional[Tensor]          # x as the kernels read it: dense in its own memory format
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
        return (cdiv(self.C, self.block_c) * self.pieces, self.splits)

    def launch_args(self):
        """Arguments shared by the big kernels, after their tensors."""
        return (self.n, self.s, self.piece_len, self.tiles_per_split)

    def meta(self):
        """Compile-time arguments shared by the big kernels."""
        return dict(CHANNELS_LAST=self.channels_last, BLOCK_I=self.block_i, BLOCK_C=self.block_c,
                    num_warps=TUNING["num_warps"])


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
        block_c = min(next_pow2(C), TUNING["max_block_c"] or (1024 if interp else 128), tile)
        block_i = max(1, min(tile // block_c, next_pow2(piece_len)))
    else:
        block_i = _block_along_positions(piece_len, tile)
        block_c = max(1, min(next_pow2(C), tile // block_i))
    tiles = n * cdiv(piece_len, block_i)
    per_split = cdiv(C, block_c) * pieces
    splits = max(1, min(tiles, 65535, cdiv(_target_programs(device), per_split)))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)  # no empty programs
    return Plan(x, memory_format, channels_last, C, pieces, n, s, piece_len, block_i, block_c,
                splits, tiles_per_split)


def plan(x: Tensor, pieces: int) -> Plan:
    x, fmt = dense_layout(x)
    return plan_for_shape(tuple(x.shape), fmt, pieces, x.device, x)


def small_blocks(num: int, parts: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_K, BLOCK_P) of a finalize kernel: BLOCK_K statistics (or channels) per program,
    each reading its ``parts`` consecutive partials BLOCK_P at a time.

    On a GPU a program holds FINALIZE_LANES elements per step: few statistics with many
    partials (BGN with G << C: C/G * splits partials each) get wide rows, so one group's
    reduction is a tree over thousands of lanes, not a loop over its channels; many
    statistics get many programs (at most 128 statistics each)."""
    if device.type != "cuda" and not TUNING["gpu_blocks"]:  # interpreter: one program, few loop trips
        return min(next_pow2(num), 1024), min(next_pow2(parts), max(1, 16384 // next_pow2(num)))
    block_p = min(next_pow2(parts), max(64, FINALIZE_LANES // next_pow2(num)))
    return max(1, min(next_pow2(num), FINALIZE_LANES // block_p, 128)), block_p


def grad_finalize_blocks(C: int, num_groups: int, pieces: int, channels_per_group: int,
                         splits: int, device: torch.device, stats_half: bool = True,
                         channel_half: bool = True):
    """Grid and blocks of the backward's finalize kernel: its statistics half (BLOCK_K
    statistics of channels_per_group * splits partials each; k_x, k_0) and its channel half
    (BLOCK_KC channels of pieces * splits partials each; grad_weight, grad_bias) are blocked
    independently; program i takes block i of the halves that run, so the grid is the larger
    of those."""
    block_k, block_p = small_blocks(num_groups, channels_per_group * splits, device)
    block_kc, block_pc = small_blocks(C, pieces * splits, device)
    grid = (max(cdiv(num_groups, block_k) if stats_half else 1, cdiv(C, block_kc) if channel_half else 1),)
    return grid, dict(BLOCK_K=block_k, BLOCK_P=block_p, BLOCK_KC=block_kc, BLOCK_PC=block_pc)
