"""The small-batch section: where a training step is bound by the host (Python, dispatch,
autograd, op and launch counts), not by memory bandwidth.

1. Per call, on a tiny input (default ``2x8x2x2``, so the arithmetic is negligible): each
   layer's module against ``nn.BatchNorm2d`` (conv + CBN against conv + BN), in three
   directions: ``fwd`` (training forward, input and parameters requiring grad), ``fwd+bwd``
   (that forward and ``autograd.grad`` of the input and parameters), ``eval`` (eval mode
   under ``torch.no_grad``). Per call also the dispatched non-view ops (``count_ops``) and,
   on CUDA, the GPU launches (``count_launches``).
2. A whole-network SGD training step (zero_grad, forward, cross-entropy, backward, update)
   of the ``conv_stack`` (ResNet-18 widths and strides, input ``8x3x64x64``) and of
   torchvision's resnet18 where it imports, built with BatchNorm and converted to each layer.

Timing as the rest of the benchmark: alternating rounds (baseline first in one round,
last in the next), the median per round (``host_median_ms``: thread CPU time with one CPU
thread), ratios the medians of the per-round ratios, spread flags. Rows are plain dicts.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from stochnorm_ext.bench.cases import CBN_WINDOW, STOCH_P
from stochnorm_ext.bench.counting import count_launches, count_ops
from stochnorm_ext.bench.environment import scrub_paths
from stochnorm_ext.bench.networks import (NETWORK_INPUT, RESNET18_WIDTHS, SMALL_BGN_GROUPS, conv_stack,
                                          small_bgn_groups, torchvision_resnet18, training_step, with_layer)
from stochnorm_ext.bench.subjects import batch_norm_kind
from stochnorm_ext.bench.throughput import MAX_SPREAD, ROUNDS, _round_ratios, inconsistent_part
from stochnorm_ext.bench.timing import TimerSettings, host_median_ms, host_timer_method, spread
from stochnorm_ext.nn import BatchGroupNorm2d, Conv2dCBN, StochNorm2d

CALL_SHAPE = (2, 8, 2, 2)
CALL_DIRECTIONS = ("fwd", "fwd+bwd", "eval")
COUNTED_CALLS = 2          # calls per op / launch count (a count that differs between them is an error)


@dataclass
class SmallBatchConfig:
    """What the section runs on. ``quick()``: the smoke configuration of ``--quick``."""
    call_shape: Tuple[int, ...] = CALL_SHAPE
    network_input: Tuple[int, ...] = NETWORK_INPUT
    widths: Tuple[int, ...] = RESNET18_WIDTHS
    resnet18_input: Optional[Tuple[int, ...]] = NETWORK_INPUT   # None: no resnet18 rows
    bgn_groups: Tuple[str, ...] = SMALL_BGN_GROUPS
    per_call: bool = True
    network: bool = True

    @classmethod
    def quick(cls) -> "SmallBatchConfig":
        """The conv stack at an eighth of the widths on 2x3x16x16, no resnet18 (its step
        alone takes about 0.1 s on one CPU thread even at 32x32)."""
        return cls(network_input=(2, 3, 16, 16), widths=tuple(w // 8 for w in RESNET18_WIDTHS),
                   resnet18_input=None)

    def stack_label(self) -> str:
        return f"conv stack {'x'.join(map(str, self.network_input))}"

    def describe(self) -> List[str]:
        widths = ",".join(map(str, self.widths))
        lines = [f"per call: input {'x'.join(map(str, self.call_shape))} float32"] if self.per_call else []
        if self.network:
            lines.append(f"network step: {self.stack_label()} (widths {widths})"
                         + (f"; resnet18 {'x'.join(map(str, self.resnet18_input))}" if self.resnet18_input else ""))
        return lines


@dataclass
class CallSubject:
    layer: str                 # bn, stoch_norm, bgn G=<spec>, conv+bn, conv+cbn
    impl: str                  # our backend, or the kernel F.batch_norm ran (native, cudnn)
    module: nn.Module
    backend: Optional[str] = None
    baseline: bool = False


def _bgn_label(spec: str) -> str:
    return f"bgn G={spec.replace(' ', '').upper()}"


def call_subject_names(layers: Sequence[str], backends: Sequence[str],
                       groups: Sequence[str] = SMALL_BGN_GROUPS) -> List[Tuple[str, str]]:
    """(layer, impl) of every per-call subject, baselines first (for the plan and the progress)."""
    names = [("bn", "baseline")]
    if "stoch_norm" in layers:
        names += [("stoch_norm", b) for b in backends]
    for spec in (groups if "bgn" in layers else ()):
        names += [(_bgn_label(spec), b) for b in backends]
    if "cbn" in layers:
        names += [("conv+bn", "baseline")] + [("conv+cbn", b) for b in backends]
    return names


def network_layer_names(layers: Sequence[str], groups: Sequence[str] = SMALL_BGN_GROUPS) -> List[str]:
    """The layers a network is converted to (``with_layer``'s names), BatchNorm first."""
    names = ["bn"] + (["stoch_norm"] if "stoch_norm" in layers else [])
    names += [_bgn_label(spec) for spec in (groups if "bgn" in layers else ())]
    return names + (["cbn"] if "cbn" in layers else [])


def build_call_subjects(device: str, layers: Sequence[str], backends: Sequence[str], bn_kind: str,
                        channels: int, groups: Sequence[str] = SMALL_BGN_GROUPS) -> List[CallSubject]:
    """The modules timed per call, float32 on ``device``, each with its own state; the conv
    is 3x3 from C channels (padding 1, no bias) in front of BN and CBN alike."""
    torch.manual_seed(0)
    C = channels
    subjects = [CallSubject("bn", bn_kind, nn.BatchNorm2d(C), baseline=True)]
    if "stoch_norm" in layers:
        subjects += [CallSubject("stoch_norm", b, StochNorm2d(C, p=STOCH_P, backend=b), b) for b in backends]
    for spec in (groups if "bgn" in layers else ()):
        G = small_bgn_groups(spec, C)
        subjects += [CallSubject(_bgn_label(spec), b, BatchGroupNorm2d(C, G, backend=b), b) for b in backends]
    if "cbn" in layers:
        conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        subjects.append(CallSubject("conv+bn", bn_kind, nn.Sequential(conv, nn.BatchNorm2d(C)), baseline=True))
        for b in backends:
            block = Conv2dCBN(C, C, 3, padding=1, window=CBN_WINDOW, backend=b)
            with torch.no_grad():
                block.conv.weight.copy_(conv.weight)
            subjects.append(CallSubject("conv+cbn", b, block, b))
    for s in subjects:
        s.module.to(device)
    return subjects


def call_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, direction: str) -> Callable[[], object]:
    """One call of ``direction``. Puts the module in the direction's mode now; the callable
    does not (a mode switch is not part of a call)."""
    module.train(direction != "eval")
    params = [p for p in module.parameters() if p.requires_grad]
    if direction == "fwd":
        return lambda: module(x)
    if direction == "fwd+bwd":
        return lambda: torch.autograd.grad(module(x), [x] + params, dy)

    def evaluate():
        with torch.no_grad():
            return module(x)
    return evaluate


def _counts(step: Callable[[], object], device: str) -> Tuple[Optional[int], Optional[int], str]:
    """(ops, launches, error) per call of ``step``."""
    try:
        ops = count_ops(step, calls=COUNTED_CALLS)
        launches = count_launches(step, calls=COUNTED_CALLS) if device == "cuda" else None
        return ops, launches, ""
    except Exception as exc:
        return None, None, scrub_paths(f"counting: {type(exc).__name__}: {exc}")


def _row(section: str, device: str, case: str, layer: str, impl: str, direction: str, backend: Optional[str],
         baseline: bool, timer: str) -> dict:
    return dict(section=section, device=device, case=case, layer=layer, impl=impl, direction=direction,
                backend=backend, baseline=baseline, time_ms=None, round_times_ms=[], ops=None, launches=None,
                timer=timer, error="")


def _timed_rounds(steps: List[Tuple[dict, Optional[Callable[[], object]], Optional[Callable[[], object]]]],
                  settings: TimerSettings, rounds: int, progress) -> None:
    """Time each (row, step, prepare) once per round, in alternating order (baselines come
    first in the list: first in even rounds, last in odd ones); ``prepare`` (untimed) runs
    before each timing. Fills ``round_times_ms`` and ``time_ms`` (their median)."""
    for round_index in range(rounds):
        order = steps if round_index % 2 == 0 else steps[::-1]
        for row, step, prepare in order:
            progress.step(f"{row['device']} small batch {row['case']} {row['layer']}/{row['impl']} {row['direction']}")
            if row["error"]:
                continue
            try:
                if prepare is not None:
                    prepare()
                row["round_times_ms"].append(host_median_ms(step, settings))
            except Exception as exc:  # reported in the table and the exit status
                row["error"] = scrub_paths(f"{type(exc).__name__}: {exc}")
    for row, _, _ in steps:
        row["time_ms"] = statistics.median(row["round_times_ms"]) if row["round_times_ms"] else None


def run_per_call(device: str, layers: Sequence[str], backends: Sequence[str], settings: TimerSettings,
                 progress, rounds: int = ROUNDS, config: SmallBatchConfig = SmallBatchConfig()) -> List[dict]:
    """The per-call rows: every subject in every direction, op (and launch) counts per call."""
    N, C, H, W = config.call_shape
    torch.manual_seed(1)
    x = (torch.randn(N, C, H, W) * 2 + 0.5).to(device).requires_grad_()
    dy = torch.randn(N, C, H, W).to(device)
    subjects = build_call_subjects(device, layers, backends, batch_norm_kind(x.detach()), C, config.bgn_groups)
    case, timer = f"{N}x{C}x{H}x{W} f32", host_timer_method(settings)
    steps = []
    for s in subjects:
        for direction in CALL_DIRECTIONS:
            row = _row("per-call", device, case, s.layer, s.impl, direction, s.backend, s.baseline, timer)
            try:  # warm up (fills CBN windows, first-call paths), then count
                step = call_step(s.module, x, dy, direction)
                for _ in range(CBN_WINDOW + 1):
                    step()
                row["ops"], row["launches"], row["error"] = _counts(step, device)
            except Exception as exc:
                step, row["error"] = None, scrub_paths(f"{type(exc).__name__}: {exc}")
            # the mode is set again before each timing: the module is shared by the directions
            steps.append((row, step, lambda m=s.module, d=direction: m.train(d != "eval")))
    _timed_rounds(steps, settings, rounds, progress)
    return [row for row, _, _ in steps]


def _network_models(config: SmallBatchConfig) -> List[Tuple[str, Tuple[int, ...], Optional[nn.Module], str]]:
    """(case label, input shape, BatchNorm model or None, why not) of each network."""
    models = [(config.stack_label(), config.network_input,
               conv_stack(config.widths, in_channels=config.network_input[1]), "")]
    if config.resnet18_input:
        resnet = torchvision_resnet18()
        label = f"resnet18 {'x'.join(map(str, config.resnet18_input))}"
        models.append((label, config.resnet18_input, resnet, "" if resnet is not None else "torchvision does not import"))
    return models


def run_network(device: str, layers: Sequence[str], backends: Sequence[str], settings: TimerSettings,
                progress, rounds: int = ROUNDS, config: SmallBatchConfig = SmallBatchConfig()) -> List[dict]:
    """The network rows: one SGD training step per call of each network with each layer
    (per our backend), op (and launch) counts per step."""
    timer = host_timer_method(settings)
    bn_kind = batch_norm_kind(torch.randn(2, 4, 3, 3, device=device))
    rows = []
    for case, shape, model, why_not in _network_models(config):
        if model is None:
            rows.append(dict(_row("network", device, case, "-", "-", "step", None, False, timer), skipped=why_not))
            continue
        steps = []
        for layer in network_layer_names(layers, config.bgn_groups):
            for backend in ([None] if layer == "bn" else backends):
                impl = bn_kind if backend is None else backend
                row = _row("network", device, case, layer, impl, "step", backend, layer == "bn", timer)
                step = None
                try:
                    torch.manual_seed(0)
                    step = training_step(with_layer(model, layer, backend), shape, device)  # converts a copy
                    for _ in range(CBN_WINDOW + 1):
                        step()
                    row["ops"], row["launches"], row["error"] = _counts(step, device)
                except Exception as exc:
                    row["error"] = scrub_paths(f"{type(exc).__name__}: {exc}")
                steps.append((row, step, None))
        _timed_rounds(steps, settings, rounds, progress)
        rows += [row for row, _, _ in steps]
    return rows


def run_small_batch(device: str, layers: Sequence[str], backends: Sequence[str], settings: TimerSettings,
                    progress, rounds: int = ROUNDS, config: SmallBatchConfig = SmallBatchConfig(),
                    max_spread: float = MAX_SPREAD) -> List[dict]:
    """Both parts on ``device``, with ratios and flags (``add_small_batch_metrics``)."""
    rows = run_per_call(device, layers, backends, settings, progress, rounds, config) if config.per_call else []
    rows += run_network(device, layers, backends, settings, progress, rounds, config) if config.network else []
    add_small_batch_metrics(rows, max_spread)
    return rows


def planned_timings(layers: Sequence[str], backends: Sequence[str], config: SmallBatchConfig) -> int:
    """How many timings (per round) the section takes: for the progress total."""
    calls = len(call_subject_names(layers, backends, config.bgn_groups)) * len(CALL_DIRECTIONS) if config.per_call else 0
    per_network = 1 + (len(network_layer_names(layers, config.bgn_groups)) - 1) * len(backends)
    networks = (1 + (config.resnet18_input is not None)) if config.network else 0
    return calls + networks * per_network


def add_small_batch_metrics(rows: List[dict], max_spread: float = MAX_SPREAD) -> None:
    """Each row's ratio to its baseline (bn, or conv+bn for conv+cbn; the bn network for a
    network row) round by round, its spread, and the noisy / inconsistent flags."""
    def key(r, layer=None, direction=None):
        return r["device"], r["section"], r["case"], layer or r["layer"], direction or r["direction"]
    baselines: Dict[tuple, dict] = {key(r): r for r in rows if r["baseline"]}
    by_key: Dict[tuple, dict] = {key(r) + (r["impl"],): r for r in rows}
    for r in rows:
        if r.get("skipped"):
            r.update(ratio_to_bn=None, spread=None, flag="")
            continue
        base = "conv+bn" if r["layer"].startswith("conv+") else "bn"  # conv+bn is its own baseline
        ratio, ratio_spread = _round_ratios(r, baselines.get(key(r, base)))
        r["ratio_to_bn"] = ratio
        r["spread"] = spread(r["round_times_ms"]) if r["baseline"] else ratio_spread
        r["flag"] = f"noisy (spread {100 * r['spread']:.0f}%)" if (r["spread"] or 0) > max_spread else ""
    for r in rows:
        if r["direction"] == "fwd+bwd":
            fwd = by_key.get(key(r, direction="fwd") + (r["impl"],))
            if inconsistent_part({"fwd+bwd": r, "fwd": fwd}):
                r["flag"] = fwd["flag"] = "inconsistent: fwd+bwd < fwd"
