"""How a time is taken: the timer per device, the input copies rotated past the cache, the
callable of one direction (fwd, bwd, fwd+bwd), and the statistics over alternating rounds."""
from __future__ import annotations

import functools
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from stochnorm_ext.bench.cases import DTYPES, Case

COPY_BUFFER_BYTES = 256 * 2**20


def last_level_cache_bytes(device: str) -> int:
    """L2 of the GPU, or the largest CPU cache; 50 MB when unknown."""
    fallback = 50 * 10**6
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or fallback)
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in os.listdir(root):
            with open(os.path.join(root, index, "size")) as f:
                text = f.read().strip()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        pass
    return max(sizes, default=fallback)


def have_triton_do_bench() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:
        return False
    return os.environ.get("TRITON_INTERPRET") != "1"


@dataclass
class TimerSettings:
    """How long one timing runs in one round (a timing is taken once per round), and on
    CPU with how many threads.

    With one CPU thread the clock is the thread's CPU time: every op of the step (autograd
    included) runs on the calling thread, so it counts exactly the step's work and not
    the time the thread waited while other processes had the core (on a busy 2-core
    machine the wall clock of one step jumps by scheduler slices). With more threads the
    workers' time is not the caller's: the wall clock."""
    device: str
    min_run_time_s: float = 0.05  # CPU: blocked_autorange's minimum measuring time
    warmup_ms: int = 5            # CUDA
    rep_ms: int = 10              # CUDA
    threads: int = 1              # CPU

    @property
    def method(self) -> str:
        if self.device != "cuda":
            clock = "thread CPU time" if self.threads == 1 else "wall clock"
            return f"torch.utils.benchmark.Timer.blocked_autorange ({clock})"
        return "triton.testing.do_bench" if have_triton_do_bench() else "CUDA events"

    @property
    def rotates_inputs(self) -> bool:
        return self.method != "triton.testing.do_bench"  # do_bench clears L2 itself


def median_ms(step: Callable[[], object], settings: TimerSettings) -> float:
    """Median time of ``step()`` in milliseconds. On CPU, blocked_autorange's block-size
    estimate is the warm-up (the subjects ran a few full steps before any timing)."""
    if settings.device == "cuda":
        if settings.method == "triton.testing.do_bench":
            import triton.testing
            return float(triton.testing.do_bench(step, warmup=settings.warmup_ms, rep=settings.rep_ms,
                                                 return_mode="median"))
        return _cuda_events_median_ms(step, settings)
    from torch.utils.benchmark import Timer
    clock = time.thread_time if settings.threads == 1 else time.perf_counter
    timer = Timer(stmt="step()", globals={"step": step}, num_threads=settings.threads, timer=clock)
    return timer.blocked_autorange(min_run_time=settings.min_run_time_s).median * 1e3


def host_median_ms(step: Callable[[], object], settings: TimerSettings) -> float:
    """Median time of ``step()`` in milliseconds where the host path is what is timed (tiny
    inputs, whole small-batch steps): on CPU as ``median_ms``; on CUDA the wall clock of
    ``blocked_autorange`` with the device synchronised at each block's ends, so a step
    counts its Python, dispatch and launches plus any wait for the GPU (``do_bench`` and
    CUDA events time the GPU's stream, where a host-bound step shows only as gaps)."""
    if settings.device != "cuda":
        return median_ms(step, settings)
    from torch.utils.benchmark import Timer

    def clock() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()
    timer = Timer(stmt="step()", globals={"step": step}, timer=clock)
    return timer.blocked_autorange(min_run_time=settings.min_run_time_s).median * 1e3


HOST_TIMER_CUDA = "torch.utils.benchmark.Timer.blocked_autorange (wall clock, synchronised)"


def host_timer_method(settings: TimerSettings) -> str:
    """The clock ``host_median_ms`` uses with these settings."""
    return settings.method if settings.device != "cuda" else HOST_TIMER_CUDA


def _cuda_events_median_ms(step, settings: TimerSettings) -> float:
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < settings.warmup_ms:
        step()
        torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    repeats = max(10, int(settings.rep_ms / estimate_ms))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for begin, end in events:
        begin.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return float(np.median([begin.elapsed_time(end) for begin, end in events]))


def copy_bandwidth_gbps(settings: TimerSettings, rounds: int = 1) -> float:
    """Read + write bandwidth of ``dst.copy_(src)`` on a buffer larger than any cache (the
    median over ``rounds`` timings)."""
    n = COPY_BUFFER_BYTES // 4
    src = torch.full((n,), 1.5, device=settings.device)
    dst = torch.empty_like(src)
    ms = statistics.median(median_ms(lambda: dst.copy_(src), settings) for _ in range(rounds))
    return 2 * COPY_BUFFER_BYTES / (ms * 1e-3) / 1e9


class Rotation:
    """Calls its callables in turn: each call reads inputs that are not in cache."""

    def __init__(self, calls):
        self.calls, self.next = calls, 0

    def __call__(self):
        call = self.calls[self.next]
        self.next = (self.next + 1) % len(self.calls)
        return call()


def copies_for_cache(bytes_per_call: int, cache_bytes: int, limit: int = 16) -> int:
    """How many input copies make the rotated working set at least twice the cache."""
    return max(1, min(limit, math.ceil(2 * cache_bytes / max(bytes_per_call, 1))))


def make_inputs(case: Case, channels: int, copies: int) -> List[Tuple[Tensor, Tensor]]:
    """``copies`` pairs (input requiring grad, output gradient) in the case's layout."""
    fmt = torch.channels_last if case.memory_format == "channels_last" else torch.contiguous_format
    dtype = DTYPES[case.dtype]
    shape = (case.batch, channels, case.height, case.width)
    out_shape = (case.batch, case.channels, case.height, case.width)
    pairs = []
    for _ in range(copies):
        x = (torch.randn(shape, device=case.device) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(out_shape, device=case.device).to(dtype).contiguous(memory_format=fmt)
        pairs.append((x.requires_grad_(), dy))
    return pairs


def direction_step(subject, inputs, direction: str) -> Callable[[], object]:
    """A callable running one ``direction`` of ``subject``, rotating over ``inputs``."""
    def grads(y, x, dy, retain=False):
        return torch.autograd.grad(y, [x] + subject.params, dy, retain_graph=retain)

    if direction == "fwd":
        calls = [functools.partial(subject.forward, x) for x, _ in inputs]
    elif direction == "fwd+bwd":
        calls = [lambda x=x, dy=dy: grads(subject.forward(x), x, dy) for x, dy in inputs]
    else:  # bwd: one forward graph per input copy, backpropagated again and again
        graphs = [(subject.forward(x), x, dy) for x, dy in inputs]
        calls = [functools.partial(grads, y, x, dy, True) for y, x, dy in graphs]
    return Rotation(calls)


def spread(values: Sequence[float]) -> Optional[float]:
    """How far the rounds disagree, as a fraction: (max - min) / median, the fastest and the
    slowest round left out when there are 5 or more (the median does not depend on them,
    and one burst of load should not hide an otherwise steady figure); None with fewer
    than two rounds (nothing to compare)."""
    if len(values) < 2:
        return None
    kept = sorted(values)[1:-1] if len(values) >= 5 else sorted(values)
    return (kept[-1] - kept[0]) / statistics.median(kept)
