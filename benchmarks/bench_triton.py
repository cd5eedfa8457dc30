"""Benchmark the Triton backend against PyTorch's BatchNorm on ResNet-50 layer shapes.

For every case (layer shape x batch x dtype x memory format) and direction (fwd, bwd,
fwd+bwd, training mode) it times, with ``triton.testing.do_bench`` (median; L2 flushed
before each repetition, and inputs rotated through a pool larger than L2):

    triton:bn        our BGN with G = C, i.e. BatchNorm on the shared Triton kernels
    triton:stoch     our StochNorm (p = 0.5 mask)
    triton:bgn       our BGN with G = C / 16 groups of whole channels
    triton:cbn       our CBN normalisation step with 3 compensated past entries
    torch:bn         torch.nn.functional.batch_norm, training (cuDNN for float32;
                     bfloat16 BatchNorm does not go to cuDNN but to PyTorch's native CUDA
                     kernel: the table names which one ran)
    torch:stoch-2bn  the published StochNorm: two F.batch_norm calls (moving branch with
                     snapshot running stats, batch branch) mixed by torch.where

and reports time, GB/s at the minimum bytes (fwd: read x + write y; bwd: read x and dy +
write dx), the fraction of the measured device-to-device copy bandwidth, and for our
kernels the bytes they actually move over that minimum (fwd: stats pass + apply pass =
3 tensor passes / 2; bwd: reduce + apply = 5 / 3).

    python benchmarks/bench_triton.py                      # everything (takes a while)
    python benchmarks/bench_triton.py --batch 32 --dtype bf16 --layout channels_last
    python benchmarks/bench_triton.py --dry-run            # print the planned cases, no GPU needed
    python benchmarks/bench_triton.py --json results.json  # also keep the numbers

Needs a CUDA device (exits with a message otherwise, except with --dry-run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (C, H, W) of every BatchNorm in torchvision's ResNet-50 (v1.5: stride in the 3x3 conv).
RESNET50_BN_SHAPES: Tuple[Tuple[int, int, int], ...] = (
    (64, 112, 112),                                   # stem
    (64, 56, 56), (256, 56, 56),                      # layer1
    (128, 56, 56), (128, 28, 28), (512, 28, 28),      # layer2
    (256, 28, 28), (256, 14, 14), (1024, 14, 14),     # layer3
    (512, 14, 14), (512, 7, 7), (2048, 7, 7),         # layer4
)
BATCHES = (2, 8, 32, 128)
DTYPES = ("fp32", "bf16")
LAYOUTS = ("nchw", "channels_last")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("triton:bn", "triton:stoch", "triton:bgn", "triton:cbn", "torch:bn", "torch:stoch-2bn")
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
# Tensor passes over the data our kernels make, divided by the minimum (see docstring).
TRITON_PASSES = {"fwd": (3, 2), "bwd": (5, 3), "fwd+bwd": (8, 5)}
L2_ROTATION_BYTES = 256 * 2 ** 20   # rotate inputs through at least this much memory


class Case(NamedTuple):
    shape: Tuple[int, int, int, int]
    dtype: str
    layout: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def label(self) -> str:
        n, c, h, w = self.shape
        return f"{n}x{c}x{h}x{w} {self.dtype} {self.layout}"


def min_bytes(case: Case, direction: str) -> int:
    """Bytes any implementation must move: fwd reads x and writes y; bwd reads x and dy
    and writes dx (parameters and statistics are O(C), ignored)."""
    tensors = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[direction]
    return tensors * case.numel * ELEMENT_SIZE[case.dtype]


def triton_bytes(case: Case, direction: str) -> int:
    """Bytes our two-pass kernels move (training): each direction reads the input twice."""
    passes, minimum = TRITON_PASSES[direction]
    return min_bytes(case, direction) * passes // minimum


def plan_cases(batches=BATCHES, dtypes=DTYPES, layouts=LAYOUTS, shapes=RESNET50_BN_SHAPES) -> List[Case]:
    return [Case((n, c, h, w), dt, lay) for (c, h, w) in shapes for n in batches
            for dt in dtypes for lay in layouts]


def rotation_count(case: Case, l2_bytes: int = L2_ROTATION_BYTES) -> int:
    """How many independent input sets to cycle through so that one cycle (x, y, dy, dx)
    spans more than ``l2_bytes``; at least 2, at most 64."""
    per_set = 4 * case.numel * ELEMENT_SIZE[case.dtype]
    return max(2, min(64, math.ceil(l2_bytes / per_set)))


# ---------------------------------------------------------------------------------------
# GPU part
# ---------------------------------------------------------------------------------------

def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of 1 GiB)."""
    import torch
    from triton.testing import do_bench
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def _make_runner(impl: str, case: Case, direction: str):
    """A zero-argument callable running one direction of ``impl`` on the next input set."""
    import torch
    import torch.nn.functional as F
    from stochnorm_ext import _backend_triton as T

    dtype = _torch_dtype(case.dtype)
    N, C, H, W = case.shape
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    sets = []
    for _ in range(rotation_count(case)):
        x = torch.randn(case.shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
        sets.append(dict(x=x.requires_grad_(), dy=torch.randn_like(x)))
    weight = torch.rand(C, device="cuda", requires_grad=True)
    bias = torch.randn(C, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    mask = torch.rand(C, device="cuda") < 0.5
    past = (torch.randn(3, C, device="cuda") * 0.1, torch.rand(3, C, device="cuda") + 0.5,
            torch.ones(3, C, dtype=torch.bool, device="cuda"))
    w_dt, b_dt = weight.to(dtype).detach().requires_grad_(), bias.to(dtype).detach().requires_grad_()

    def forward(x):
        if impl == "triton:bn":
            return T.batch_group_norm(x, C, weight, bias, rm, rv, True, 0.1, 1e-5)
        if impl == "triton:bgn":
            return T.batch_group_norm(x, max(1, C // 16), weight, bias, rm[: max(1, C // 16)],
                                      rv[: max(1, C // 16)], True, 0.1, 1e-5)
        if impl == "triton:stoch":
            return T.stoch_norm(x, weight, bias, rm, rv, mask, True, 0.1, 1e-5)
        if impl == "triton:cbn":
            return T.cross_iteration_norm(x, weight, bias, rm, rv, *past, True, 0.1, 1e-5)[0]
        # PyTorch baselines: parameters in the input's dtype, as nn.BatchNorm would be
        if impl == "torch:bn":
            return F.batch_norm(x, rm, rv, w_dt, b_dt, training=True)
        if impl == "torch:stoch-2bn":
            moving = F.batch_norm(x, rm.clone(), rv.clone(), w_dt, b_dt, training=False)
            batch = F.batch_norm(x, rm, rv, w_dt, b_dt, training=True)
            return torch.where(mask.view(1, C, 1, 1), batch, moving)
        raise ValueError(impl)

    params = (w_dt, b_dt) if impl.startswith("torch:") else (weight, bias)
    state = {"i": 0}

    if direction == "bwd":
        for s in sets:  # one graph per input set, kept for repeated backward passes
            s["y"] = forward(s["x"])

        def run():
            s = sets[state["i"] % len(sets)]
            state["i"] += 1
            torch.autograd.grad(s["y"], (s["x"],) + params, s["dy"], retain_graph=True)
    elif direction == "fwd":
        def run():
            s = sets[state["i"] % len(sets)]
            state["i"] += 1
            with torch.no_grad():
                forward(s["x"])
    else:
        def run():
            s = sets[state["i"] % len(sets)]
            state["i"] += 1
            torch.autograd.grad(forward(s["x"]), (s["x"],) + params, s["dy"])
    return run


def _torch_bn_backend(case: Case) -> str:
    """Which kernel F.batch_norm uses here (cuDNN takes float32/float16, not bfloat16,
    and needs cudnn enabled)."""
    import torch
    if case.dtype == "bf16" or not torch.backends.cudnn.enabled:
        return "native"
    return "cudnn"


def _environment() -> Dict[str, str]:
    import torch
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": str(torch.version.cuda), "python": platform.python_version(), "commit": commit}


def run_benchmarks(cases: List[Case], impls, directions, out=sys.stdout) -> List[dict]:
    import torch
    from triton.testing import do_bench
    copy_bw = _copy_bandwidth()
    env = _environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()), file=out)
    print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s", file=out)
    header = f"{'case':34s} {'dir':8s} {'impl':22s} {'ms':>9s} {'GB/s':>7s} {'%copy':>6s} {'moved/min':>9s}"
    print(header, file=out)
    rows = []
    for case in cases:
        for direction in directions:
            for impl in impls:
                run = _make_runner(impl, case, direction)
                ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                gbps = min_bytes(case, direction) / (ms * 1e-3) / 1e9
                moved = (f"{triton_bytes(case, direction) / min_bytes(case, direction):.2f}"
                         if impl.startswith("triton:") else "n/a")
                name = impl + (f" ({_torch_bn_backend(case)})" if impl.startswith("torch:") else "")
                row = dict(case=case.label(), direction=direction, impl=name, ms=ms, gbps=gbps,
                           copy_fraction=gbps * 1e9 / copy_bw, moved_over_min=moved)
                rows.append(row)
                print(f"{case.label():34s} {direction:8s} {name:22s} {ms:9.4f} {gbps:7.0f} "
                      f"{100 * row['copy_fraction']:5.0f}% {moved:>9s}", file=out, flush=True)
                del run
                torch.cuda.empty_cache()
    return [dict(env, copy_bandwidth_gbps=copy_bw / 1e9, **r) for r in rows]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Triton backend vs PyTorch BatchNorm on ResNet-50 shapes")
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=sorted(ELEMENT_SIZE))
    parser.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--direction", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    parser.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--shapes", type=int, nargs="+", metavar="INDEX",
                        help="indices into the ResNet-50 shape list (default: all 12)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned cases and bytes, run nothing")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    shapes = RESNET50_BN_SHAPES if args.shapes is None else tuple(RESNET50_BN_SHAPES[i] for i in args.shapes)
    cases = plan_cases(args.batch, args.dtype, args.layout, shapes)
    if args.dry_run:
        print(f"{len(cases)} cases x {len(args.direction)} directions x {len(args.impl)} implementations")
        for case in cases:
            sizes = " ".join(f"{d}={min_bytes(case, d) / 2 ** 20:.1f}MiB" for d in args.direction)
            print(f"{case.label():34s} min bytes: {sizes}; inputs rotated over {rotation_count(case)} sets")
        return 0

    import torch
    if not torch.cuda.is_available():
        print("bench_triton: needs a CUDA GPU (none found); use --dry-run to see the plan", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    from stochnorm_ext import _backend_triton as T
    if T.UNAVAILABLE:
        print(f"bench_triton: the triton backend is unavailable: {T.UNAVAILABLE}", file=sys.stderr)
        return 2
    rows = run_benchmarks(cases, args.impl, args.direction)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
