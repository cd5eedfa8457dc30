"""What a run writes: the table (plain text or markdown), the legend that explains every
column and flag, the run's header lines, JSON, CSV and the markdown section."""
from __future__ import annotations

import csv
import json
import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from stochnorm_ext.bench.cases import Case, case_of
from stochnorm_ext.bench.checks import CheckResult
from stochnorm_ext.bench.throughput import CONSISTENCY_SLACK
from stochnorm_ext.bench.timing import COPY_BUFFER_BYTES

COLUMNS = [("layer", "layer"), ("impl", "impl"), ("direction", "dir"), ("time_ms", "ms"),
           ("ratio_to_bn", "/BN"), ("spread", "spread"), ("ratio_to_reference", "/ref"), ("gbps", "GB/s"),
           ("copy_fraction", "%copy"), ("bytes_vs_minimum", "bytes/min"),
           ("bytes_source", "bytes"), ("check", "check")]
# The figures a flagged row does not print (its rounds do not support them).
TIMED_FIGURES = ("ratio_to_reference", "gbps", "copy_fraction")


def legend(rounds: int, max_spread: float, copy_gbps: Dict[str, float]) -> List[Tuple[str, str]]:
    """(column or flag, what it means) for every column of the table and every flag."""
    copy = ", ".join(f"{device} {gbps:.1f} GB/s" for device, gbps in copy_gbps.items())
    return [
        ("layer", "bn: F.batch_norm in training, the baseline; conv+bn: the conv of conv+cbn + F.batch_norm, its "
                  "baseline; stoch_norm, bgn (G = C/4; 'bgn G=<spec>': --bgn-groups), cbn (the normalisation step "
                  "with 3 compensated past entries), conv+cbn (the conv + a whole CBN step, window 4): ours"),
        ("impl", "published: the composition of the published code or paper; reference, cpu, triton, cuda: our "
                 "backends; on bn rows the kernel F.batch_norm ran (native, cudnn)"),
        ("dir", "fwd: training forward; bwd: backward alone (a kept graph backpropagated again); fwd+bwd: both, "
                "one training step"),
        ("ms", f"time of one call in milliseconds: the median over {rounds} alternating round(s) of each "
               "round's median"),
        ("/BN", "time ratio to the baseline of the same case and direction (conv+* rows: to conv+bn), the median "
                "of the per-round ratios; lower is better, below 1 = faster than BatchNorm"),
        ("spread", "how far the rounds disagree: (max - min) / median of the per-round ratios (baseline rows: "
                   "of their times), the fastest and slowest round left out when there are 5 or more; '-' "
                   "with a single round"),
        ("/ref", "time ratio to our reference backend (the executable specification, not a fast path)"),
        ("GB/s", "bytes moved / median time"),
        ("%copy", f"GB/s over the dst.copy_(src) bandwidth measured first ({copy}; read + write of "
                  f"{COPY_BUFFER_BYTES // 2**20} MiB). Above 100% means that not every byte counted came from "
                  "memory: the second pass of a two-pass kernel reads the cache, and 'ops' counts assume no "
                  "cache reuse between eager ops (an upper bound)"),
        ("bytes/min", "bytes moved over the least a normalisation moves (fwd: read x + write y; bwd: read x, dy "
                      "+ write dx; fwd+bwd: both)"),
        ("bytes", "where the bytes moved come from: kernel = the backend's bytes_moved(); est = two-pass "
                  "estimate (fwd reads x twice and writes y, bwd reads x and dy twice and writes dx); ops = "
                  "counted aten ops of the eager code, each reading its inputs and writing its outputs once; "
                  "'-' = conv rows (a conv is not memory-bound: only the time ratio means something)"),
        ("check", "pass / FAIL: this backend against the float64 reference on this dtype (the checks above)"),
        ("noisy (spread N%)", f"in /BN instead of the ratio when spread > {100 * max_spread:.0f}%: the rounds "
                              "disagree too much for a figure (/ref, GB/s and %copy are left out too); re-run on "
                              "a quieter machine or with more --rounds"),
        ("inconsistent: fwd+bwd < fwd", f"in /BN of both rows when fwd+bwd took less than "
                                        f"{100 * (1 - CONSISTENCY_SLACK):.0f}% of fwd (or bwd) alone in every "
                                        "round: one of the two timings is wrong, neither is printed"),
    ]


def format_legend(entries: Sequence[Tuple[str, str]], markdown: bool = False) -> str:
    if markdown:
        return "\n".join(["Legend:", ""] + [f"- `{name}`: {text}" for name, text in entries]) + "\n"
    width = max(len(name) for name, _ in entries)
    lines = ["Legend:"]
    for name, text in entries:
        lines += textwrap.wrap(text, 110, initial_indent=f"  {name.ljust(width)}  ",
                               subsequent_indent=" " * (width + 4))
    return "\n".join(lines) + "\n"


def format_value(field: str, value) -> str:
    """How one table cell is written; '-' for a missing number."""
    if value is None or value == "":
        return "-" if field not in ("check",) else ""
    if field == "time_ms":
        return f"{value:.4g}"
    if field in ("ratio_to_bn", "ratio_to_reference", "bytes_vs_minimum"):
        return f"{value:.2f}"
    if field == "gbps":
        return f"{value:.1f}"
    if field in ("copy_fraction", "spread"):
        return f"{100 * value:.0f}%"
    return str(value)


def row_cells(row: dict) -> List[str]:
    """A row's cells; a flagged row prints its flag instead of its ratio to BatchNorm."""
    cells = []
    for field, _ in COLUMNS:
        if row.get("flag") and field == "ratio_to_bn":
            cells.append(row["flag"])
        elif row.get("flag") and field in TIMED_FIGURES:
            cells.append("-")
        else:
            cells.append(format_value(field, row.get(field)))
    return cells


def format_table(rows: List[dict], markdown: bool = False) -> str:
    """The result table, one block per case (plain text, or markdown with a heading per case)."""
    cases: Dict[Case, List[dict]] = {}
    for r in rows:
        cases.setdefault(case_of(r), []).append(r)
    headers = [h for _, h in COLUMNS]
    blocks = []
    for case, case_rows in cases.items():
        cells = [row_cells(r) for r in case_rows]
        errors = [f"{r['layer']}/{r['impl']} {r['direction']}: {r['error']}" for r in case_rows if r["error"]]
        if markdown:
            lines = [f"#### {case.device} {case.label}", "",
                     "| " + " | ".join(headers) + " |",
                     "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in cells]
            lines += [""] + [f"- error: {e}" for e in errors]
        else:
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

            def fmt(row):
                return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
            lines = [f"== {case.device} {case.label}", fmt(headers)] + [fmt(c) for c in cells]
            lines += [f"   error: {e}" for e in errors]
        blocks.append("\n".join(lines).rstrip())
    return "\n\n".join(blocks) + "\n"


def flag_summary(rows: List[dict]) -> str:
    """How many rows are flagged, or '' when none is."""
    noisy = sum(r.get("flag", "").startswith("noisy") for r in rows)
    inconsistent = sum(r.get("flag", "").startswith("inconsistent") for r in rows)
    if not noisy and not inconsistent:
        return ""
    return (f"flagged: {noisy} noisy and {inconsistent} inconsistent of {len(rows)} rows (their ratios are "
            "not printed; see the legend)")


def device_lines(device: str, environment: dict) -> List[str]:
    """How a device was timed: name, threads and why, timer, rounds, copy bandwidth."""
    info = environment["devices"][device]
    lines = [f"{device}: {info['name']}; timer {info['timer']}; {environment['rounds']} alternating round(s) "
             f"per timing; copy bandwidth {info['copy_gbps']:.1f} GB/s"]
    if device == "cpu":
        threads = environment["threads"]
        lines.append(f"threads: {threads['count']} ({threads['why']})")
    return lines


def load_line(environment: dict) -> str:
    """The load averages at the start (and the end, once measured) against the cores."""
    start, end = environment["load_average_at_start"], environment.get("load_average_at_end")
    cores = environment["cores_available"]
    busy = start is not None and max(start[0], (end or start)[0]) >= cores
    return (f"load average (1/5/15 min) at start {start}" + (f", at end {end}" if end else "")
            + f", on {cores} CPU cores" + (": a busy machine (more runnable processes than cores)" if busy else ""))


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def write_csv(path: str, rows: List[dict]) -> None:
    fields = list(rows[0].keys()) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def markdown_report(device: str, environment: dict, checks: List[CheckResult], rows: List[dict],
                    legend_entries: Sequence[Tuple[str, str]], plot_path: Optional[str],
                    markdown_path: str) -> str:
    """One device's section of the results file: environment, checks, tables, legend, plot."""
    info = environment["devices"][device]
    device_rows = [r for r in rows if r["device"] == device]
    lines = [f"### {device}: {info['name']}", "",
             f"- command (from the repository root): `{environment['command']}`",
             f"- torch {environment['torch']}, triton {environment['triton']}, CUDA {environment['cuda']}, "
             f"cuDNN {environment['cudnn']}, Python {environment['python']}",
             f"- commit {environment['commit']}" + (" (the working tree had uncommitted changes)"
                                                    if environment["dirty"] else ""),
             "- backends here: " + ", ".join(f"{k}: {'available' if v is None else 'unavailable (' + v + ')'}"
                                               for k, v in environment["backends"].items())]
    lines += [f"- {line}" for line in device_lines(device, environment)[1:]]
    lines += [f"- timer: {info['timer']}; {environment['rounds']} alternating round(s) per timing; copy "
              f"bandwidth {info['copy_gbps']:.1f} GB/s",
              f"- {load_line(environment)}", "",
              "Checks against the float64 reference (`stochnorm_ext.selfcheck`)"
              + (", Triton under its interpreter (checked, not timed)" if device == "cpu" and any(
                  c.backend == "triton" and c.device == "cpu" for c in checks) else "") + ":", "", "```"]
    lines += [c.line() for c in checks if c.device == device] or ["(none run)"]
    lines += ["```", "", format_table(device_rows, markdown=True)]
    summary = flag_summary(device_rows)
    lines += ([summary[0].upper() + summary[1:] + ".", ""] if summary else [])
    lines += [format_legend(legend_entries, markdown=True)]
    if plot_path:
        rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(markdown_path)))
        lines += [f"![fwd+bwd time over BatchNorm's, per layer (lower is better)]({rel})", ""]
    return "\n".join(lines)


def update_markdown(path: str, device: str, section: str) -> None:
    """Put ``section`` between this device's markers in ``path`` (replacing what was there),
    or append it with markers when the file has none (creating the file)."""
    start, end = f"<!-- bench:{device}:start -->", f"<!-- bench:{device}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else ""
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    with open(path, "w") as f:
        f.write(text)
