"""What the small-batch section writes: its two tables (per call; whole-network step), plain
text or markdown, the legend that explains every column and flag, and its markdown
section of the results file (``<!-- bench:DEVICE-small-batch:start/end -->``)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from stochnorm_ext.bench.report import format_legend, load_line
from stochnorm_ext.bench.throughput import CONSISTENCY_SLACK

CALL_COLUMNS = [("layer", "layer"), ("impl", "impl"), ("direction", "dir"), ("time_us", "us"),
                ("ratio_to_bn", "/BN"), ("spread", "spread"), ("ops", "ops"), ("launches", "launches")]
NETWORK_COLUMNS = [("layer", "layer"), ("impl", "impl"), ("time_ms", "ms"), ("ratio_to_bn", "/BN"),
                   ("spread", "spread"), ("ops", "ops"), ("launches", "launches")]
SECTION_TITLES = {"per-call": "per call", "network": "training step"}


def legend(rounds: int, max_spread: float, devices: Sequence[str]) -> List[Tuple[str, str]]:
    """(column or flag, what it means) for both small-batch tables."""
    gpu = "cuda" in devices
    return [
        ("layer", "per call: bn = nn.BatchNorm2d (the baseline); stoch_norm = StochNorm2d (p 0.5); bgn G=C/4, "
                  "bgn G=1 = BatchGroupNorm2d with groups of 4 channels / one group; conv+bn = nn.Conv2d 3x3 C->C "
                  "(padding 1, no bias) + nn.BatchNorm2d, the baseline of conv+cbn = Conv2dCBN (the same conv + "
                  "CrossIterationBatchNorm2d, window 4, full). Training step: the network built with "
                  "nn.BatchNorm2d (bn, the baseline) and converted by stochnorm_ext.convert_model (cbn: window 4, "
                  "bound to every conv -> BN pair)"),
        ("impl", "our backend (backend=...); bn / conv+bn rows: the kernel F.batch_norm ran (native, cudnn)"),
        ("dir", "fwd: training forward (input and parameters require grad); fwd+bwd: that forward and "
                "autograd.grad of the input and parameters; eval: eval mode under torch.no_grad"),
        ("us / ms", f"time of one call (us) or one SGD training step (ms: zero_grad, forward, cross-entropy, "
                    f"backward, SGD momentum 0.9 update): the median over {rounds} alternating round(s) of each "
                    "round's median; the input is tiny, so it is the host path (Python, dispatch, autograd, "
                    "allocations), not arithmetic"),
        ("/BN", "time ratio to the baseline of the same table and direction (conv+cbn: to conv+bn; a network: "
                "to the same network with BatchNorm), the median of the per-round ratios; lower is better"),
        ("spread", "how far the rounds disagree: (max - min) / median of the per-round ratios (baseline rows: "
                   "of their times), the fastest and slowest round left out when there are 5 or more"),
        ("ops", "dispatched non-view ops per call or step (stochnorm_ext.bench.count_ops, a TorchDispatchMode "
                "below autograd): ATen and stochnorm_ext ops, allocations and in-place updates included, views "
                "(view, permute, detach, ...) left out, ops inside a compiled kernel not seen; counted over 2 "
                "calls after warm-up (they must agree)"),
        ("launches", "GPU kernels (+ memcpy / memset) per call or step, from torch.profiler's CUDA activity "
                     "(stochnorm_ext.bench.count_launches)" + ("" if gpu else "; '-': counted on CUDA only, and "
                                                                 "this run had no CUDA device")),
        ("noisy (spread N%)", f"in /BN instead of the ratio when spread > {100 * max_spread:.0f}%: the rounds "
                              "disagree too much for a figure; re-run on a quieter machine or with more --rounds"),
        ("inconsistent: fwd+bwd < fwd", f"in /BN of both rows when fwd+bwd took less than "
                                        f"{100 * (1 - CONSISTENCY_SLACK):.0f}% of fwd alone in every round"),
    ]


def _cell(field: str, row: dict) -> str:
    if row.get("flag") and field == "ratio_to_bn":
        return row["flag"]
    value = row["time_ms"] * 1e3 if field == "time_us" and row["time_ms"] is not None else row.get(field)
    if value is None or value == "":
        return "-"
    if field in ("time_us", "time_ms"):
        return f"{value:.4g}"
    if field == "ratio_to_bn":
        return f"{value:.2f}"
    if field == "spread":
        return f"{100 * value:.0f}%"
    return str(value)


def format_tables(rows: List[dict], markdown: bool = False) -> str:
    """One table per (device, part, case): per-call rows, then one per network."""
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["device"], r["section"], r["case"]), []).append(r)
    blocks = []
    for (device, section, case), group in groups.items():
        columns = CALL_COLUMNS if section == "per-call" else NETWORK_COLUMNS
        headers = [h for _, h in columns]
        title = f"{device} small batch, {SECTION_TITLES[section]}: {case}"
        shown = [r for r in group if not r.get("skipped")]
        cells = [[_cell(f, r) for f, _ in columns] for r in shown]
        notes = [f"skipped: {r['skipped']}" for r in group if r.get("skipped")]
        notes += [f"error: {r['layer']}/{r['impl']} {r['direction']}: {r['error']}" for r in shown if r["error"]]
        text_columns = 3 if section == "per-call" else 2
        if markdown:
            lines = [f"#### {title}", ""]
            if cells:
                lines += ["| " + " | ".join(headers) + " |",
                          "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(headers))) + "|"]
                lines += ["| " + " | ".join(c) + " |" for c in cells]
            lines += [""] + [f"- {n}" for n in notes]
        else:
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)] if cells else []

            def fmt(row):
                return "  ".join(v.ljust(w) if i < text_columns else v.rjust(w)
                                 for i, (v, w) in enumerate(zip(row, widths)))
            lines = [f"== {title}"] + ([fmt(headers)] + [fmt(c) for c in cells] if cells else [])
            lines += [f"   {n}" for n in notes]
        blocks.append("\n".join(lines).rstrip())
    return "\n\n".join(blocks) + "\n"


def flag_summary(rows: List[dict]) -> str:
    flagged = sum(bool(r.get("flag")) for r in rows)
    return (f"small batch: {flagged} of {len(rows)} rows flagged (their ratios are not printed; see the legend)"
            if flagged else "")


def markdown_section(device: str, environment: dict, rows: List[dict], legend_entries, config_lines) -> str:
    """The small-batch section of one device for the results file."""
    info = environment["devices"][device]
    lines = [f"### {device} small batch: {info['name']}", "",
             f"- command (from the repository root): `{environment['command']}`",
             f"- torch {environment['torch']}, triton {environment['triton']}, CUDA {environment['cuda']}, "
             f"Python {environment['python']}",
             f"- commit {environment['commit']}" + (" (the working tree had uncommitted changes)"
                                                    if environment["dirty"] else "")]
    if device == "cpu":
        threads = environment["threads"]
        lines.append(f"- threads: {threads['count']} ({threads['why']})")
    lines += [f"- timer: {info['small_batch_timer']}; {environment['rounds']} alternating round(s) per timing",
              f"- {load_line(environment)}"]
    lines += [f"- {line}" for line in config_lines]
    lines += ["", format_tables([r for r in rows if r["device"] == device], markdown=True)]
    summary = flag_summary([r for r in rows if r["device"] == device])
    lines += ([summary[0].upper() + summary[1:] + ".", ""] if summary else [])
    lines += [format_legend(legend_entries, markdown=True)]
    return "\n".join(lines)
