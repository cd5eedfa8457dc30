"""The layers against BatchNorm at training sizes: every subject of a case timed in every
direction in alternating rounds, then per row the median time, the median of the per-round
ratios to the baseline and to our reference, bandwidth, and the flags that withhold a
figure the rounds do not support (too wide a spread; fwd+bwd faster than one of its parts).

(A section per question: a small-batch section, timing host time and launches, would sit
beside this one as its own module.)"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from stochnorm_ext.bench.cases import (BASELINE_LAYERS, BGN_GROUPS, CBN_WINDOW, DIRECTIONS, Case, base_layer,
                                       baseline_of, conv_in_channels)
from stochnorm_ext.bench.checks import CheckResult
from stochnorm_ext.bench.environment import scrub_paths
from stochnorm_ext.bench.subjects import Subject, batch_norm_kind, build_subjects
from stochnorm_ext.bench.timing import (TimerSettings, copies_for_cache, direction_step, last_level_cache_bytes,
                                        make_inputs, median_ms, spread)
from stochnorm_ext.bench.traffic import bytes_for, minimum_bytes

ROUNDS = 5                 # alternating rounds per timing by default (--rounds)
MAX_SPREAD = 0.25          # a row whose rounds spread wider is flagged noisy (--max-spread)
CONSISTENCY_SLACK = 0.10   # fwd+bwd below 90% of fwd (or bwd) in every round is flagged


def row_for(case: Case, subject: Subject, direction: str, round_times_ms: Sequence[float],
            moved: Optional[int], bytes_source: str, copies: int, timer: str, error: str = "") -> dict:
    """One result row; ``time_ms`` is the median of the per-round times."""
    return dict(device=case.device, layer=subject.layer, impl=subject.impl, batch=case.batch,
                channels=case.channels, height=case.height, width=case.width, dtype=case.dtype,
                memory_format=case.memory_format, direction=direction,
                time_ms=statistics.median(round_times_ms) if round_times_ms else None,
                round_times_ms=list(round_times_ms),
                bytes_moved=moved, bytes_minimum=minimum_bytes(direction, case.numel, case.element_size)
                if subject.bytes_source != "-" else None,
                bytes_source=bytes_source, input_copies=copies, timer=timer, error=error,
                backend=subject.backend)


def benchmark_case(case: Case, layers, backends, settings: TimerSettings, progress, rounds: int = ROUNDS,
                   groups: Sequence[str] = tuple(BGN_GROUPS), conv: str = "1x1") -> List[dict]:
    """Time every subject in every direction on one case, once per round. The rounds
    alternate over the subjects, baseline first in one round and last in the next, so a
    burst of background load lands on both sides of a ratio."""
    # Copies by the fwd+bwd working set: x, y, dy, dx.
    copies = 1
    if settings.rotates_inputs:
        copies = copies_for_cache(4 * case.numel * case.element_size, last_level_cache_bytes(case.device))
    norm_inputs = make_inputs(case, case.channels, copies)
    conv_inputs = make_inputs(case, conv_in_channels(case.channels, conv), copies) if "cbn" in layers else None
    bn_kind = batch_norm_kind(norm_inputs[0][0].detach())
    subjects = build_subjects(case, layers, backends, bn_kind, groups=groups, conv=conv)
    inputs_of = [conv_inputs if subject.conv_input else norm_inputs for subject in subjects]
    times: Dict[Tuple[int, str], List[float]] = {(i, d): [] for i in range(len(subjects)) for d in DIRECTIONS}
    errors: Dict[Tuple[int, str], str] = {}
    for i, subject in enumerate(subjects):
        try:  # also fills CBN windows and compiles/autotunes kernels before any timing
            for _ in range(CBN_WINDOW):
                direction_step(subject, inputs_of[i][:1], "fwd+bwd")()
        except Exception as exc:
            errors.update({(i, d): f"{type(exc).__name__}: {exc}" for d in DIRECTIONS})
    for round_index in range(rounds):
        order = list(range(len(subjects)))
        for i in (order if round_index % 2 == 0 else reversed(order)):
            subject = subjects[i]
            for direction in DIRECTIONS:
                progress.step(f"{case.device} {case.label} {subject.layer}/{subject.impl} {direction}")
                if (i, direction) in errors:
                    continue
                try:
                    times[i, direction].append(median_ms(direction_step(subject, inputs_of[i], direction),
                                                         settings))
                except Exception as exc:  # keep going; reported in the table and the exit status
                    errors[i, direction] = f"{type(exc).__name__}: {exc}"
                    if case.device == "cuda":
                        torch.cuda.empty_cache()
    rows = []
    for i, subject in enumerate(subjects):
        for direction in DIRECTIONS:
            try:
                if (i, direction) in errors:
                    raise RuntimeError(errors[i, direction])
                moved, source = bytes_for(subject, case, direction, inputs_of[i])
                rows.append(row_for(case, subject, direction, times[i, direction], moved, source,
                                    len(inputs_of[i]), settings.method))
            except Exception as exc:
                error = errors.get((i, direction)) or f"{type(exc).__name__}: {exc}"
                rows.append(row_for(case, subject, direction, [], None, "-", len(inputs_of[i]),
                                    settings.method, scrub_paths(error)))
    return rows


def _round_ratios(row: dict, other: Optional[dict]) -> Tuple[Optional[float], Optional[float]]:
    """The median over rounds of row time / other time, round by round, and its spread."""
    if other is None or not row["round_times_ms"] or len(row["round_times_ms"]) != len(other["round_times_ms"]):
        return None, None
    ratios = [t / t_other for t, t_other in zip(row["round_times_ms"], other["round_times_ms"])]
    return statistics.median(ratios), spread(ratios)


def inconsistent_part(parts: Dict[str, Optional[dict]]) -> Optional[str]:
    """The direction (fwd or bwd) that fwd+bwd took less than (1 - slack) of in every round,
    or None. The whole step cannot be faster than a part of it: one of the two timings is
    wrong (e.g. threads spinning while descheduled on a busy machine)."""
    whole = parts.get("fwd+bwd")
    if whole is None or not whole["round_times_ms"]:
        return None
    for name in ("fwd", "bwd"):
        part = parts.get(name)
        if part is None or len(part["round_times_ms"]) != len(whole["round_times_ms"]):
            continue
        if all(t < (1 - CONSISTENCY_SLACK) * t_part
               for t, t_part in zip(whole["round_times_ms"], part["round_times_ms"])):
            return name
    return None


def add_metrics(rows: List[dict], copy_gbps: Dict[str, float], checks: List[CheckResult],
                max_spread: float = MAX_SPREAD) -> None:
    """Ratios to the baseline and the reference, their spread, the flag, GB/s, copy
    fraction, check column."""
    def key(r, layer=None, impl=None, direction=None):
        return (r["device"], r["batch"], r["channels"], r["height"], r["width"], r["dtype"],
                r["memory_format"], direction or r["direction"], layer or r["layer"], impl or r["impl"])
    by_key = {key(r): r for r in rows}
    baseline = {key(r, impl="baseline"): r for r in rows if r["layer"] in BASELINE_LAYERS}
    check_ok: Dict[tuple, bool] = {}
    for c in checks:
        k = (c.device, c.backend, c.layer, c.dtype)
        check_ok[k] = check_ok.get(k, True) and c.ok
    for r in rows:
        t = r["time_ms"]
        is_baseline = r["layer"] in BASELINE_LAYERS
        r["ratio_to_bn"], ratio_spread = _round_ratios(r, baseline.get(key(r, baseline_of(r["layer"]), "baseline")))
        r["ratio_to_reference"] = None if is_baseline else _round_ratios(r, by_key.get(key(r, impl="reference")))[0]
        # A baseline row's own rounds; any other row's ratio to the baseline, round by round.
        r["spread"] = spread(r["round_times_ms"]) if is_baseline else ratio_spread
        has_bytes = t and r["bytes_moved"]
        r["gbps"] = r["bytes_moved"] / (t * 1e-3) / 1e9 if has_bytes else None
        r["copy_fraction"] = r["gbps"] / copy_gbps[r["device"]] if r["gbps"] else None
        r["bytes_vs_minimum"] = r["bytes_moved"] / r["bytes_minimum"] if has_bytes else None
        check_layer = "cbn" if r["layer"] == "conv+cbn" else base_layer(r["layer"])
        ok = check_ok.get((r["device"], r["backend"], check_layer, r["dtype"]))
        r["check"] = "" if ok is None else ("pass" if ok else "FAIL")
        r["flag"] = f"noisy (spread {100 * r['spread']:.0f}%)" if (r["spread"] or 0) > max_spread else ""
    for r in rows:
        if r["direction"] == "fwd+bwd":
            parts = {d: by_key.get(key(r, direction=d)) for d in DIRECTIONS}
            name = inconsistent_part(parts)
            if name:  # the clearer problem: it stands over a noisy flag
                r["flag"] = parts[name]["flag"] = f"inconsistent: fwd+bwd < {name}"
