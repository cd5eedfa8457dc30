"""CPU benchmark of the C++ kernels (``backend="cpu"``) against PyTorch's BatchNorm and the
pure-PyTorch reference, on ResNet-style shapes.

    python benchmarks/bench_cpu.py                 # 2 threads, full table, markdown on stdout
    python benchmarks/bench_cpu.py --quick         # two shapes, shorter runs
    python benchmarks/bench_cpu.py --output benchmarks/RESULTS_CPU.md

Every number is a time measured in this run with ``torch.utils.benchmark`` (median of a
blocked autorange), and every ratio is between two numbers of the same run. Implementations
are measured in alternating rounds and each keeps its best round, so that a burst of
background load does not land on one side of a ratio only.

Measured, per layer and shape, float32, NCHW and channels_last, in training mode:

- fwd: the forward call with autograd recording (inputs require grad), as in training;
- bwd: ``torch.autograd.grad`` of that forward's output w.r.t. input, weight and bias;
- fwd+bwd: both.

StochNorm (p = 0.5 mask, fixed per shape) and BGN (G = C/4, and G = 2C where the spatial size
allows) run through ``stochnorm_ext.functional`` (validation, dispatch, autograd, running
update included), against ``torch.nn.functional.batch_norm`` and the same functional call with
``backend="reference"``; CBN's normalisation step (3 compensated past entries) through the
backend function. The whole CBN step runs as conv + CBN (``Conv2dCBN``, 3x3 conv, window 4,
full window) against conv + ``BatchNorm2d`` and against the published formulation: the
Jacobians of the mean and mean of squares w.r.t. the conv weight by ``torch.autograd.grad``
every step.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stochnorm_ext as sx  # noqa: E402
from stochnorm_ext import functional as F  # noqa: E402
from stochnorm_ext._backend import resolve  # noqa: E402

SHAPES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7),
          (32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7)]
QUICK_SHAPES = [(8, 64, 56, 56), (8, 512, 7, 7)]
CBN_SHAPES = [(8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7), (32, 64, 28, 28)]
QUICK_CBN_SHAPES = [(8, 64, 28, 28), (8, 256, 7, 7)]


# --------------------------------------------------------------------------- timing
def measure(fns: Dict[str, Callable[[], None]], min_run_time: float, rounds: int) -> Dict[str, float]:
    """Best-round median seconds of each function, rounds alternating between them."""
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # warm-up (allocator, first-touch)
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
            best[name] = min(best[name], t.median)
    return best


def _layout(t: torch.Tensor, fmt: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else t.contiguous()


# --------------------------------------------------------------------------- StochNorm / BGN
def norm_modes(call: Callable[..., torch.Tensor], inputs, dy, stats) -> Dict[str, Callable[[], None]]:
    """fwd, bwd and fwd+bwd closures of one normalisation call ``call(running_mean, running_var)``.
    The graph that bwd reuses gets its own running statistics: the other calls update theirs in
    place, which autograd would (rightly) refuse for BatchNorm, which saves them."""
    held = {"y": call(*(t.clone() for t in stats))}

    def fwd():
        call(*stats)

    def bwd():
        torch.autograd.grad(held["y"], inputs, dy, retain_graph=True)

    def fwd_bwd():
        torch.autograd.grad(call(*stats), inputs, dy)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def bench_layers(shapes, formats, min_run_time, rounds, log) -> List[dict]:
    rows = []
    for shape in shapes:
        N, C, H, W = shape
        for fmt in formats:
            g = torch.Generator().manual_seed(0)
            x = _layout(torch.randn(shape, generator=g), fmt).requires_grad_()
            dy = _layout(torch.randn(shape, generator=g), fmt)
            w = (1 + 0.1 * torch.randn(C, generator=g)).requires_grad_()
            b = (0.1 * torch.randn(C, generator=g)).requires_grad_()
            mask = torch.rand(C, generator=g) < 0.5
            inputs = (x, w, b)
            stats = lambda n: (torch.zeros(n), torch.ones(n))  # noqa: E731
            bn = norm_modes(lambda rm, rv: TF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1),
                            inputs, dy, stats(C))
            # layer -> (call(running_mean, running_var, backend), statistics count)
            layers = {
                "StochNorm": (lambda rm, rv, be: F.stoch_norm(x, rm, rv, w, b, training=True, mask=mask,
                                                              backend=be), C),
                "BGN G=C/4": (lambda rm, rv, be: F.batch_group_norm(x, C // 4, rm, rv, w, b, training=True,
                                                                    backend=be), C // 4),
            }
            if (H * W) % 2 == 0:
                layers["BGN G=2C"] = (lambda rm, rv, be: F.batch_group_norm(x, 2 * C, rm, rv, w, b, training=True,
                                                                            backend=be), 2 * C)
            # CBN's normalisation step with a full window (3 compensated past entries, some dropped)
            past = (0.1 * torch.randn(3, C, generator=g), 1 + 0.1 * torch.rand(3, C, generator=g),
                    torch.rand(3, C, generator=g) < 0.8)
            layers["CBN norm K=3"] = (lambda rm, rv, be: resolve(be, x.device).cross_iteration_norm(
                x, w, b, rm, rv, *past, True, 0.1, 1e-5)[0], C)
            for layer, (fn, n_stats) in layers.items():
                ours = norm_modes(lambda rm, rv, fn=fn: fn(rm, rv, "cpu"), inputs, dy, stats(n_stats))
                ref = norm_modes(lambda rm, rv, fn=fn: fn(rm, rv, "reference"), inputs, dy, stats(n_stats))
                row = dict(layer=layer, shape=shape, fmt=fmt)
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    t = measure({"bn": bn[mode], "ours": ours[mode], "ref": ref[mode]}, min_run_time, rounds)
                    row[mode] = t
                rows.append(row)
                log(_layer_line(row))
    return rows


# --------------------------------------------------------------------------- CBN
class PublishedStyleCBN(nn.Module):
    """Conv + CBN in the published formulation (Yao et al.'s code, eps inside the square root so
    that it computes what ours does): every training step takes the mean and the mean of squares
    of the conv output and their Jacobians w.r.t. the conv weight with ``torch.autograd.grad``,
    compensates the stored steps with them, and normalises with plain autograd ops. The window
    is kept in Python lists, as in that code."""

    def __init__(self, cin, cout, window=4, rho=1.0, eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.weight = nn.Parameter(torch.ones(cout))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.window, self.rho, self.eps = window, rho, eps
        self.past = []  # (mu, meanx2, dmu/dw, dmeanx2/dw, weight) per stored step

    def forward(self, inp):
        x = self.conv(inp)
        w = self.conv.weight
        mu = x.mean((0, 2, 3))
        meanx2 = (x * x).mean((0, 2, 3))
        dmu = torch.autograd.grad(mu.sum(), w, retain_graph=True)[0]
        dmeanx2 = torch.autograd.grad(meanx2.sum(), w, retain_graph=True)[0]
        mus, nus, keeps = [mu], [meanx2], [torch.ones_like(mu)]
        for p_mu, p_nu, p_dmu, p_dnu, p_w in self.past:
            dw = w.detach() - p_w
            c_mu = p_mu + self.rho * (p_dmu * dw).sum((1, 2, 3))
            c_nu = p_nu + self.rho * (p_dnu * dw).sum((1, 2, 3))
            keep = (c_nu - c_mu * c_mu >= 0).to(mu.dtype)
            mus.append(c_mu * keep)
            nus.append(c_nu * keep)
            keeps.append(keep)
        count = torch.stack(keeps).sum(0)
        mean = torch.stack(mus).sum(0) / count
        var = torch.stack(nus).sum(0) / count - mean * mean
        y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + self.eps)
        y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        self.past.insert(0, (mu.detach(), meanx2.detach(), dmu.detach(), dmeanx2.detach(), w.detach().clone()))
        del self.past[self.window - 1:]
        return y


def bench_cbn(shapes, formats, min_run_time, rounds, log) -> List[dict]:
    rows = []
    for shape in shapes:
        N, C, H, W = shape
        for fmt in formats:
            torch.manual_seed(0)
            x = _layout(torch.randn(shape), fmt).requires_grad_()
            dy = _layout(torch.randn(shape), fmt)
            conv_bn = nn.Sequential(nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
            ours = sx.Conv2dCBN(C, C, 3, padding=1, window=4, backend="cpu")
            published = PublishedStyleCBN(C, C, window=4)
            # Only the convs: Module.to(memory_format=channels_last) also reformats 5-d tensors and
            # fails on CBN's 5-d window buffers.
            for conv in (conv_bn[0], ours.conv, published.conv):
                conv.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)

            def step(m):
                params = [x] + list(m.parameters())
                return lambda: torch.autograd.grad(m(x), params, dy)

            fns = {"conv+bn": step(conv_bn), "conv+cbn": step(ours), "published": step(published)}
            for fn in fns.values():  # fill the windows
                for _ in range(4):
                    fn()
            t = measure(fns, min_run_time, rounds)
            row = dict(shape=shape, fmt=fmt, **t)
            rows.append(row)
            log(_cbn_line(row))
    return rows


# --------------------------------------------------------------------------- report
def _ms(s):
    return f"{s * 1e3:.3f}"


def _layer_line(row):
    cells = []
    for mode in ("fwd", "bwd", "fwd+bwd"):
        t = row[mode]
        cells.append(f"{mode}: BN {_ms(t['bn'])} ours {_ms(t['ours'])} ref {_ms(t['ref'])} ms "
                     f"(ours/BN {t['ours'] / t['bn']:.2f}x, ref/ours {t['ref'] / t['ours']:.2f}x)")
    return f"{row['layer']:10s} {str(row['shape']):18s} {row['fmt']:13s} " + " | ".join(cells)


def _cbn_line(row):
    return (f"conv+CBN {str(row['shape']):18s} {row['fmt']:13s} conv+BN {_ms(row['conv+bn'])} ms, conv+CBN "
            f"{_ms(row['conv+cbn'])} ms ({row['conv+cbn'] / row['conv+bn']:.2f}x), published "
            f"{_ms(row['published'])} ms (published/ours {row['published'] / row['conv+cbn']:.2f}x)")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown(layer_rows, cbn_rows, header) -> str:
    out = [header, ""]
    out.append("### Each layer's normalisation (float32, training) vs `F.batch_norm` and the reference")
    out.append("")
    out.append("Times in ms. `ours/BN`: lower is better (target for fwd+bwd: <= 1.2). "
               "`ref/ours`: speed-up over the reference (target: >= 2).")
    out.append("")
    out.append("| layer | shape | format | BN fwd | ours fwd | ref fwd | BN bwd | ours bwd | ref bwd | BN f+b "
               "| ours f+b | ref f+b | ours/BN fwd | ours/BN bwd | **ours/BN f+b** | **ref/ours f+b** |")
    out.append("|" + "---|" * 16)
    for r in layer_rows:
        f, b, fb = r["fwd"], r["bwd"], r["fwd+bwd"]
        out.append(
            f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['fmt']} | {_ms(f['bn'])} | {_ms(f['ours'])} | "
            f"{_ms(f['ref'])} | {_ms(b['bn'])} | {_ms(b['ours'])} | {_ms(b['ref'])} | {_ms(fb['bn'])} | "
            f"{_ms(fb['ours'])} | {_ms(fb['ref'])} | {f['ours'] / f['bn']:.2f} | {b['ours'] / b['bn']:.2f} | "
            f"**{fb['ours'] / fb['bn']:.2f}** | **{fb['ref'] / fb['ours']:.2f}** |")
    out.append("")
    if cbn_rows:
        out.append("### conv (3x3, C -> C) + CBN (window 4, full) fwd+bwd vs conv + BN and the published "
               "autograd-Jacobian formulation")
        out.append("")
        out.append("Times in ms. `CBN/BN`: target <= 1.5. `published/ours`: target >= 1.7.")
        out.append("")
        out.append("| shape (conv in = out) | format | conv+BN | conv+CBN (ours) | published-style | **CBN/BN** | "
                   "**published/ours** |")
        out.append("|---|---|---|---|---|---|---|")
        for r in cbn_rows:
            out.append(f"| {'x'.join(map(str, r['shape']))} | {r['fmt']} | {_ms(r['conv+bn'])} | "
                       f"{_ms(r['conv+cbn'])} | {_ms(r['published'])} | **{r['conv+cbn'] / r['conv+bn']:.2f}** | "
                       f"**{r['published'] / r['conv+cbn']:.2f}** |")
        out.append("")
    out.append("### Targets")
    out.append("")
    for layer in sorted({r["layer"] for r in layer_rows}):
        rows = [r for r in layer_rows if r["layer"] == layer]
        ratios = [r["fwd+bwd"]["ours"] / r["fwd+bwd"]["bn"] for r in rows]
        speedups = [r["fwd+bwd"]["ref"] / r["fwd+bwd"]["ours"] for r in rows]
        out.append(f"- {layer} fwd+bwd vs BN: <= 1.2x on {sum(v <= 1.2 for v in ratios)}/{len(ratios)} cases "
                   f"(geomean {_geomean(ratios):.2f}x, worst {max(ratios):.2f}x); >= 2x faster than the reference on "
                   f"{sum(v >= 2 for v in speedups)}/{len(speedups)} (geomean {_geomean(speedups):.2f}x, "
                   f"worst {min(speedups):.2f}x)")
    if cbn_rows:
        ratios = [r["conv+cbn"] / r["conv+bn"] for r in cbn_rows]
        speedups = [r["published"] / r["conv+cbn"] for r in cbn_rows]
        out.append(f"- conv+CBN fwd+bwd vs conv+BN: <= 1.5x on {sum(v <= 1.5 for v in ratios)}/{len(ratios)} "
                   f"(geomean {_geomean(ratios):.2f}x, worst {max(ratios):.2f}x); >= 1.7x faster than published on "
                   f"{sum(v >= 1.7 for v in speedups)}/{len(speedups)} (geomean {_geomean(speedups):.2f}x, "
                   f"worst {min(speedups):.2f}x)")
    out.append("")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="two shapes, short runs")
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per blocked autorange")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per measurement")
    parser.add_argument("--no-cbn", action="store_true")
    parser.add_argument("--output", help="write the markdown table here as well")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if sx.backends()["cpu"] is not None:
        sys.exit(f"the cpu backend is not available: {sx.backends()['cpu']}")
    formats = args.formats.split(",")
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    rounds = args.rounds or (1 if args.quick else 3)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    cbn_shapes = QUICK_CBN_SHAPES if args.quick else CBN_SHAPES
    load_before = os.getloadavg()
    start = time.time()
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    layer_rows = bench_layers(shapes, formats, min_run_time, rounds, log)
    cbn_rows = [] if args.no_cbn else bench_cbn(cbn_shapes, formats, min_run_time, rounds, log)
    load_after = os.getloadavg()
    header = (
        f"## CPU benchmark: {_cpu_name()}, {os.cpu_count()} cores visible, {args.threads} threads\n\n"
        f"torch {torch.__version__}, Python {platform.python_version()}, ATen CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, stochnorm_ext {sx.__version__}. "
        f"{len(layer_rows) + len(cbn_rows)} cases in {time.time() - start:.0f} s; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. min_run_time {min_run_time} s, "
        f"best of {rounds} alternating round(s).")
    text = markdown(layer_rows, cbn_rows, header)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
