"""``python -m stochnorm_ext.bench``: the options, the plan, and the run (checks, timings,
report)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import asdict
from typing import List, Optional, Sequence

import torch

import stochnorm_ext as sx
from stochnorm_ext import backend as registry
from stochnorm_ext.bench import report, report_small_batch
from stochnorm_ext.bench.cases import (BGN_GROUPS, CONVS, CPU_BATCHES, CPU_DTYPES, CPU_SHAPES, DIRECTIONS, DTYPES,
                                       GPU_BATCHES, GPU_DTYPES, GPU_SHAPES, LAYERS, MEMORY_FORMATS,
                                       RESNET50_BN_SHAPES, bgn_groups, cases_for, parse_shape)
from stochnorm_ext.bench.checks import CheckResult, backends_to_check, identity_checks, run_checks
from stochnorm_ext.bench.environment import (available_cores, choose_threads, device_name, environment_info,
                                             load_average, scrub_paths)
from stochnorm_ext.bench.small_batch import SmallBatchConfig, planned_timings, run_small_batch
from stochnorm_ext.bench.subjects import build_subject_names
from stochnorm_ext.bench.throughput import MAX_SPREAD, ROUNDS, add_metrics, benchmark_case
from stochnorm_ext.bench.timing import TimerSettings, copy_bandwidth_gbps, host_timer_method
from stochnorm_ext.bench.traffic import minimum_bytes

QUICK_ROUNDS = 3


class Progress:
    """A plain-text progress line on stderr (tqdm when it is installed)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, leave=False)
            except ImportError:
                pass
        self.tty = sys.stderr.isatty()
        self.started = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        line = f"[{self.done:4d}/{self.total}] {elapsed:5.0f}s {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120))
        elif self.done == 1 or self.done % max(1, self.total // 20) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")


def parse_bgn_groups(text: str) -> str:
    bgn_groups(text, 8)  # raises on a malformed spec
    return text


def parse_threads(text: str) -> Optional[int]:
    """``auto`` -> None (chosen for the load); else a positive count."""
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"--threads takes a positive count or 'auto'; got {text!r}")
    return count


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m stochnorm_ext.bench",
                                description="Check the three layers against the reference, then time "
                                            "them against BatchNorm (see the package docstring).")
    p.add_argument("--device", action="append", choices=["cpu", "cuda"],
                   help="devices to run on, repeatable (default: cpu, and cuda when present)")
    p.add_argument("--layers", nargs="+", choices=LAYERS, default=LAYERS,
                   help="layers to time (default: all; cbn also times conv+cbn against conv+bn)")
    p.add_argument("--backends", nargs="+", choices=list(sx.BACKEND_NAMES),
                   help="our backends to time (default: every available one that runs natively on "
                        "the device; BatchNorm and the published compositions always run)")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="CxHxW",
                   help=f"default: GPU {' '.join('x'.join(map(str, s)) for s in GPU_SHAPES)}; "
                        f"CPU {' '.join('x'.join(map(str, s)) for s in CPU_SHAPES)}; "
                        f"'resnet50': all {len(RESNET50_BN_SHAPES)} BatchNorm shapes of ResNet-50")
    p.add_argument("--batches", nargs="+", type=int,
                   help=f"default: GPU {GPU_BATCHES}, CPU {CPU_BATCHES}")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   help=f"default: GPU {GPU_DTYPES}, CPU {CPU_DTYPES}")
    p.add_argument("--memory-formats", nargs="+", choices=MEMORY_FORMATS, default=None,
                   help=f"default: {MEMORY_FORMATS}")
    p.add_argument("--bgn-groups", nargs="+", type=parse_bgn_groups, default=list(BGN_GROUPS), metavar="SPEC",
                   help="BGN group counts to time: C/k (groups of k channels), C (BatchNorm on our "
                        "kernels), kC (k pieces per channel); default: C/4")
    p.add_argument("--conv", choices=CONVS, default="1x1",
                   help="the conv of conv+bn and conv+cbn: 1x1 from C/4 channels (default), or 3x3 "
                        "from C channels with padding 1")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"alternating rounds per timing (default {ROUNDS}, --quick {QUICK_ROUNDS}): times and "
                        "ratios are medians over the rounds, and their spread flags noisy rows")
    p.add_argument("--max-spread", type=float, default=MAX_SPREAD, metavar="FRACTION",
                   help="a row whose rounds spread wider ((max - min) / median, the fastest and slowest "
                        "round left out from 5 rounds on) is flagged noisy instead of printing its ratio "
                        f"(default {MAX_SPREAD})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (cases, subjects, minimum bytes) and run nothing; no GPU needed")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: first default shape, smallest batch, first dtype, nchw, short timings")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="CPU: seconds blocked_autorange measures each timing in each round (default 0.05, "
                        "quick 0.01)")
    p.add_argument("--rep-ms", type=int, default=None,
                   help="CUDA: milliseconds of timed runs per timing in each round (default 10, quick 4)")
    p.add_argument("--threads", type=parse_threads, default=None, metavar="N|auto",
                   help="CPU threads torch uses (default auto: 1 on 2 cores or fewer or when fewer than 2 are "
                        "idle by the load average, else the idle cores; the header says what was chosen)")
    p.add_argument("--skip-checks", action="store_true", help="time without checking first")
    p.add_argument("--json", metavar="FILE", help="write the environment, checks and rows as JSON")
    p.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw each layer's fwd+bwd time over BatchNorm's (the /BN column; lower is better)")
    p.add_argument("--markdown", metavar="FILE",
                   help="write each device's report into FILE between <!-- bench:DEVICE:start/end --> "
                        "markers (replacing that section, or appending it)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    small = p.add_mutually_exclusive_group()
    small.add_argument("--small-batch-only", action="store_true",
                       help="run only the small-batch section (after the checks): per-call host time, op and "
                            "launch counts of each layer against BatchNorm on a 2x8x2x2 input, and an SGD step "
                            "of a ResNet-18-width conv stack and of torchvision's resnet18 with each layer; "
                            "--markdown then rewrites only its DEVICE-small-batch sections")
    small.add_argument("--no-small-batch", action="store_true",
                       help="skip the small-batch section (on by default; --quick runs it on a smaller network "
                            "without resnet18)")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else ROUNDS
    return args


def backends_for(device: str, requested: Optional[Sequence[str]]) -> List[str]:
    """Our backends to time on ``device``: available ones that run natively there (Triton
    on CPU tensors is its interpreter, not a speed)."""
    chosen = []
    for name in requested or sx.BACKEND_NAMES:
        reason = sx.backends()[name]
        native = registry.runs_on(name, torch.device(device)) and not (name == "triton" and device == "cpu")
        if reason is None and native:
            chosen.append(name)
        elif requested:
            why = scrub_paths(reason or f"does not run natively on {device}")
            print(f"note: backend {name!r} skipped on {device}: {why}", file=sys.stderr)
    return chosen


def thread_choice(requested: Optional[int]) -> dict:
    """The CPU threads to time with (the requested count, or the one chosen for the load),
    why, and the automatic choice."""
    load = load_average()
    auto, why = choose_threads(available_cores(), load[0] if load else None, torch.get_num_threads())
    if requested is None:
        why = f"chosen for the load: {why}; --threads N overrides"
    elif requested > auto:
        why = (f"--threads {requested}, more than the {auto} the load allows ({why}): OpenMP threads wait for "
               "descheduled ones, so timings jump by scheduler slices")
    else:
        why = f"--threads {requested}; the load allows {auto} ({why})"
    return dict(count=requested or auto, why=why, auto=auto)


def print_plan(args, devices) -> None:
    """What a run with these arguments would time (``--dry-run``): our backends are those
    available here, or the requested ones where the device is absent."""
    for device in devices:
        here = device != "cuda" or torch.cuda.is_available()
        # Without a GPU: every requested (or known) backend that can run on CUDA tensors.
        backends = (backends_for(device, args.backends) if here
                    else [n for n in args.backends or sx.BACKEND_NAMES if n != "cpu"])
        names = build_subject_names(args.layers, backends, args.bgn_groups)
        cases = cases_for(device, args)
        print(f"{device}: {len(cases)} cases x {len(names)} subjects x {len(DIRECTIONS)} directions"
              f" x {args.rounds} round(s); conv {args.conv}")
        if device == "cpu":
            threads = thread_choice(args.threads)
            print(f"  threads: {threads['count']} ({threads['why']})")
        if not args.small_batch_only:
            print("  subjects: " + ", ".join(f"{layer}/{impl}" for layer, impl in names))
        if not args.no_small_batch:
            config = small_batch_config(args)
            print(f"  small batch: {planned_timings(args.layers, backends, config)} timings x {args.rounds} "
                  f"round(s); " + "; ".join(config.describe()))
        for case in (cases if not args.small_batch_only else []):
            sizes = " ".join(f"{d}={minimum_bytes(d, case.numel, case.element_size) / 2**20:.1f}MiB"
                             for d in DIRECTIONS)
            print(f"  {case.label:34s} minimum bytes: {sizes}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if args.rounds < 1:
        print(f"error: --rounds must be at least 1, got {args.rounds}", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(args, devices)
        return 0
    if "cuda" in devices and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    threads = thread_choice(args.threads)
    torch.set_num_threads(threads["count"])
    try:
        return _run(args, argv, devices, threads)
    finally:
        torch.set_num_threads(threads_before)


def timer_settings(device: str, args) -> TimerSettings:
    """The per-round timing budget: the defaults, ``--quick``'s, or the options given."""
    settings = TimerSettings(device, threads=torch.get_num_threads())
    if args.quick:
        settings.min_run_time_s, settings.warmup_ms, settings.rep_ms = 0.01, 2, 4
    if args.min_run_time is not None:
        settings.min_run_time_s = args.min_run_time
    if args.rep_ms is not None:
        settings.rep_ms = args.rep_ms
    return settings


def _run(args, argv, devices, threads: dict) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    env = environment_info(argv)
    env.update(rounds=args.rounds, max_spread=args.max_spread, threads=threads)
    print(f"stochnorm_ext {env['stochnorm_ext']} bench: torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, commit {env['commit']}{' (dirty)' if env['dirty'] else ''}")
    print(f"{report.load_line(env)}; CPU threads: {threads['count']} ({threads['why']})")
    if "cpu" in devices and threads["count"] > threads["auto"]:
        print(f"warning: CPU threads: {threads['count']} ({threads['why']})", file=sys.stderr)

    main_section, small_section = not args.small_batch_only, not args.no_small_batch
    plan = [(device, backends_for(device, args.backends), cases_for(device, args) if main_section else [])
            for device in devices]
    checks: List[CheckResult] = []
    if not args.skip_checks:
        checks += identity_checks()
        for device, _, cases in plan:
            # selfcheck's dtypes and the benchmarked ones
            dtypes = list(dict.fromkeys(["float64", "float32", "bfloat16"] + [c.dtype for c in cases]))
            checks += run_checks(device, backends_to_check(device, args.backends), args.layers, dtypes)
        print("\nChecks against the float64 reference:")
        for c in checks:
            print("  " + c.line())

    rows, small_rows, copy_gbps = [], [], {}
    config = small_batch_config(args)
    total = sum(len(cases) * len(build_subject_names(args.layers, backends, args.bgn_groups)) * len(DIRECTIONS)
                * args.rounds + small_section * planned_timings(args.layers, backends, config) * args.rounds
                for _, backends, cases in plan)
    progress = Progress(total, enabled=not args.no_progress)
    for device, backends, cases in plan:
        settings = timer_settings(device, args)
        env["devices"][device] = dict(name=device_name(device), timer=settings.method, backends_timed=backends,
                                      small_batch_timer=host_timer_method(settings))
        if main_section:
            copy_gbps[device] = env["devices"][device]["copy_gbps"] = copy_bandwidth_gbps(settings, args.rounds)
        for case in cases:
            rows += benchmark_case(case, args.layers, backends, settings, progress, rounds=args.rounds,
                                   groups=args.bgn_groups, conv=args.conv)
        if small_section:
            small_rows += run_small_batch(device, args.layers, backends, settings, progress, args.rounds, config,
                                          args.max_spread)
    progress.close()
    env["load_average_at_end"] = load_average()
    add_metrics(rows, copy_gbps, checks, args.max_spread)
    legend = report.legend(args.rounds, args.max_spread, copy_gbps)
    small_legend = report_small_batch.legend(args.rounds, args.max_spread, devices)

    print()
    if main_section:
        for device in devices:
            print("\n".join(report.device_lines(device, env)))
    print(report.load_line(env) + "\n")
    if main_section:
        print(report.format_table(rows))
        print(report.format_legend(legend))
        summary = report.flag_summary(rows)
        if summary:
            print(summary)
    if small_section:
        print("Small batches (the host path: per call on a tiny input, and whole-network training steps); "
              + "; ".join(config.describe()) + "; timer " + "; ".join(
                  f"{d}: {env['devices'][d]['small_batch_timer']}" for d in devices) + "\n")
        print(report_small_batch.format_tables(small_rows))
        print(report.format_legend(small_legend))
        summary = report_small_batch.flag_summary(small_rows)
        if summary:
            print(summary)

    result = dict(environment=env, checks=[asdict(c) for c in checks], rows=rows, small_batch=small_rows)
    if args.json:
        report.write_json(args.json, result)
    if args.csv:
        if main_section:
            report.write_csv(args.csv, rows)
        if small_section:
            report.write_csv(_csv_beside(args.csv, "_small_batch"), small_rows)
    if args.plot:
        if main_section:
            from stochnorm_ext.bench.plot import write_plot
            write_plot(args.plot, rows, env)
        else:
            print("note: --plot draws the main section's fwd+bwd ratios; nothing drawn with --small-batch-only",
                  file=sys.stderr)
    if args.markdown:
        for device in devices:
            if main_section:
                report.update_markdown(args.markdown, device, report.markdown_report(
                    device, env, checks, rows, legend, args.plot, args.markdown))
            if small_section:
                report.update_markdown(args.markdown, f"{device}-small-batch", report_small_batch.markdown_section(
                    device, env, small_rows, small_legend, config.describe()))

    failed_checks = sum(not c.ok for c in checks)
    timed = rows + [r for r in small_rows if not r.get("skipped")]
    failed_runs = sum(bool(r["error"]) for r in timed)
    print(f"checks: {len(checks) - failed_checks} passed, {failed_checks} failed; "
          f"timings: {len(timed) - failed_runs} ran, {failed_runs} raised")
    return 1 if failed_checks or failed_runs else 0


def small_batch_config(args) -> SmallBatchConfig:
    return SmallBatchConfig.quick() if args.quick else SmallBatchConfig()


def _csv_beside(path: str, suffix: str) -> str:
    """``out.csv`` -> ``out_small_batch.csv``: the small-batch rows have their own columns."""
    stem, dot, ext = path.rpartition(".")
    return f"{stem}{suffix}.{ext}" if dot and "/" not in ext else path + suffix
