"""The small rules every level of the stack shares (docs/SPEC.md, "shared rules"), written
once: BGN's grouping, the accumulation dtype, the memory format an output keeps. The C++
side has its own copies in csrc/common.h (one per language)."""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Grouping", "grouping", "accumulate_dtype", "memory_format_of"]


class Grouping(NamedTuple):
    """How ``G`` statistics cover ``C`` channels. ``G | C``: groups of ``channels_per_group``
    whole channels (``pieces == 1``). ``G = m * C``: each channel's flattened positions cut
    into ``pieces = m`` contiguous runs, one statistic each (``channels_per_group == 1``).
    ``G == C`` (BatchNorm, StochNorm, CBN) is both: ``(1, 1)``."""
    pieces: int
    channels_per_group: int


def grouping(C: int, G: int) -> Grouping:
    """BGN's grouping of ``C`` channels into ``G`` statistics (``G | C`` or ``C | G``;
    anything else raises ValueError)."""
    if C % G == 0:
        return Grouping(1, C // G)
    if G % C == 0:
        return Grouping(G // C, 1)
    raise ValueError(f"num_groups={G} must divide the {C} channels or be a multiple of them")


def accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics accumulate in float32, or float64 for float64 input (docs/SPEC.md)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output keeps: channels_last(_3d) for such (non-contiguous) inputs,
    contiguous otherwise (``output_format`` in csrc/common.h follows the same rule)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
