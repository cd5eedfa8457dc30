"""``python -m stochnorm_ext.bench`` on a shared machine: threads chosen for the load and
reported, the CPU clock, alternating rounds, the spread and fwd/fwd+bwd consistency flags,
the legend, the plot's sense, and no absolute path of the machine in any output."""
import importlib.util
import json
import math
import os
import re
import time

import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext.bench import cases, cli, environment, report, subjects, throughput, timing

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = ["--device", "cpu", "--quick", "--shapes", "8x4x4", "--batches", "2", "--min-run-time", "0.002",
        "--no-progress"]
OUR_FAST = "cpu" if sx.backends()["cpu"] is None else "reference"


# ----------------------------------------------------------------------------- threads and clock
def test_choose_threads():
    assert environment.choose_threads(2, 0.1, 2)[0] == 1      # 2 cores: 1 thread, even when idle
    assert environment.choose_threads(1, None, 1)[0] == 1
    threads, why = environment.choose_threads(16, 15.5, 16)
    assert threads == 1 and "busy: load average 15.50 on 16 cores" in why
    assert environment.choose_threads(16, 3.0, 16)[0] == 13    # the idle cores
    assert environment.choose_threads(16, 3.0, 8)[0] == 8      # at most torch's default
    assert environment.choose_threads(8, None, 8)[0] == 8      # load unknown
    assert environment.choose_threads(4, 2.5, 4)[0] == 1       # 1.5 idle cores


def _spy_threads(monkeypatch):
    """Records the torch thread count and the clock each case is timed with."""
    seen = []
    original = cli.benchmark_case

    def spy(case, layers, backends, settings, *args, **kwargs):
        seen.append((torch.get_num_threads(), settings.method))
        return original(case, layers, backends, settings, *args, **kwargs)
    monkeypatch.setattr(cli, "benchmark_case", spy)
    return seen


def test_threads_chosen_for_the_load_and_reported(monkeypatch, capsys, tmp_path):
    """A busy 8-core machine (load 7.5): 1 thread on the thread's CPU time, said in the
    header and the JSON; forcing 2 threads warns, every time, and uses the wall clock."""
    monkeypatch.setattr(cli, "available_cores", lambda: 8)
    monkeypatch.setattr(cli, "load_average", lambda: [7.5, 1.0, 1.0])
    seen = _spy_threads(monkeypatch)
    before = torch.get_num_threads()
    path = str(tmp_path / "r.json")
    args = TINY + ["--layers", "stoch_norm", "--backends", OUR_FAST, "--skip-checks", "--json", path]
    assert cli.main(args) == 0
    out = capsys.readouterr()
    assert seen == [(1, "torch.utils.benchmark.Timer.blocked_autorange (thread CPU time)")]
    assert "CPU threads: 1 (chosen for the load: busy: load average 7.50 on 8 cores" in out.out
    assert "threads: 1 (chosen for the load" in out.out and "warning" not in out.err
    env = json.load(open(path))["environment"]
    assert env["threads"]["count"] == 1 and "thread CPU time" in env["devices"]["cpu"]["timer"]
    assert torch.get_num_threads() == before

    assert cli.main(args + ["--threads", "2"]) == 0  # the warning depends on the load and the count only
    assert "warning: CPU threads: 2 (--threads 2, more than the 1 the load allows (busy" in capsys.readouterr().err
    assert seen[-1] == (2, "torch.utils.benchmark.Timer.blocked_autorange (wall clock)")
    assert torch.get_num_threads() == before

    monkeypatch.setattr(cli, "load_average", lambda: [0.5, 0.5, 0.5])  # an idle 8-core machine
    assert cli.main(args + ["--dry-run"]) == 0
    assert f"threads: {min(before, 7)} (chosen for the load: load average 0.50 on 8 cores" in capsys.readouterr().out


def test_threads_option_rejects_nonsense():
    assert cli.parse_threads("auto") is None and cli.parse_threads("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(Exception, match="positive count or 'auto'"):
            cli.parse_threads(bad)


def test_one_thread_clock_skips_time_without_the_core():
    """1 ms of work then 20 ms of sleep, which stands for another process holding the core:
    with one thread the clock is the thread's CPU time, so the wait is not counted; the wall
    clock counts it."""
    def step():
        end = time.thread_time() + 1e-3
        while time.thread_time() < end:
            pass
        time.sleep(0.02)
    assert 0.9 <= timing.median_ms(step, timing.TimerSettings("cpu", min_run_time_s=0.005, threads=1)) < 5
    assert timing.median_ms(step, timing.TimerSettings("cpu", min_run_time_s=0.005, threads=2)) >= 20


def test_one_thread_steps_run_on_the_calling_thread():
    """What makes the thread's CPU time the right clock with one thread: every subject's
    whole training step (autograd's backward included) runs on the calling thread, so the
    process spends no CPU time elsewhere."""
    case = cases.Case("cpu", 4, 32, 16, 16, "float32", "nchw")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for subject in subjects.build_subjects(case, cases.LAYERS, [OUR_FAST, "reference"], "native"):
            channels = cases.conv_in_channels(case.channels, "1x1") if subject.conv_input else case.channels
            step = timing.direction_step(subject, timing.make_inputs(case, channels, 1), "fwd+bwd")
            step()
            thread, process = time.thread_time(), time.process_time()
            for _ in range(5):
                step()
            thread, process = time.thread_time() - thread, time.process_time() - process
            assert process - thread <= 0.05 * thread + 1e-3, (subject.layer, subject.impl, thread, process)
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- rounds and flags
def test_rounds_alternate_over_the_subjects():
    """Round 1 times the baseline first, round 2 last; every row keeps one time per round
    and reports their median."""
    class Recorder:
        def __init__(self):
            self.labels = []

        def step(self, label):
            self.labels.append(label.split(" ")[-2])  # layer/impl

    case = cases.Case("cpu", 2, 8, 4, 4, "float32", "nchw")
    progress = Recorder()
    rows = throughput.benchmark_case(case, ["stoch_norm"], [OUR_FAST], timing.TimerSettings("cpu", 0.001),
                                     progress, rounds=2)
    order = ["bn/native", "stoch_norm/published", f"stoch_norm/{OUR_FAST}"]
    expected = [s for s in order for _ in cases.DIRECTIONS] + [s for s in order[::-1] for _ in cases.DIRECTIONS]
    assert progress.labels == expected
    for r in rows:
        assert len(r["round_times_ms"]) == 2 and r["time_ms"] == pytest.approx(sum(r["round_times_ms"]) / 2)


def test_spread():
    assert timing.spread([1.0]) is None
    assert timing.spread([1.0, 1.5]) == pytest.approx(0.4)                 # 0.5 / 1.25
    assert timing.spread([1.0, 1.2, 2.0]) == pytest.approx(1.0 / 1.2)
    # From 5 rounds the fastest and slowest are left out: 1.0, 1.0, 1.1 remain.
    assert timing.spread([1.0, 1.1, 1.0, 0.5, 3.0]) == pytest.approx(0.1)


def _row(layer, impl, round_times, direction="fwd", moved=None, source="est", backend=None):
    case = cases.Case("cpu", 2, 16, 8, 8, "float32", "nchw")
    subject = subjects.Subject(layer, impl, forward=None, params=[], backend=backend, bytes_source=source)
    return throughput.row_for(case, subject, direction, round_times, moved, source, 1, "timer")


def test_noisy_row_is_flagged_not_printed():
    numel_bytes = 2 * 16 * 8 * 8 * 4
    rows = [_row("bn", "native", [2.0, 2.0, 2.0], moved=3 * numel_bytes),
            _row("stoch_norm", "cpu", [1.0, 1.6, 1.0], moved=2 * numel_bytes, backend="cpu"),   # ratios .5 .8 .5
            _row("bgn", "cpu", [1.0, 1.1, 1.0], moved=2 * numel_bytes, backend="cpu")]          # ratios .5 .55 .5
    throughput.add_metrics(rows, {"cpu": 0.01}, [])
    bn, noisy, steady = rows
    assert noisy["spread"] == pytest.approx(0.6) and noisy["flag"] == "noisy (spread 60%)"
    assert noisy["ratio_to_bn"] == pytest.approx(0.5)                      # the median is kept in the JSON
    assert steady["spread"] == pytest.approx(0.1) and steady["flag"] == ""
    assert bn["spread"] == 0 and bn["flag"] == ""
    headers = [h for _, h in report.COLUMNS]
    cells = dict(zip(headers, report.row_cells(noisy)))
    assert cells["/BN"] == "noisy (spread 60%)" and cells["spread"] == "60%"
    assert cells["/ref"] == cells["GB/s"] == cells["%copy"] == "-" and cells["ms"] == "1"
    assert dict(zip(headers, report.row_cells(steady)))["/BN"] == "0.50"
    text = report.format_table(rows)
    assert "noisy (spread 60%)" in text and "0.50" in text
    assert report.flag_summary(rows).startswith("flagged: 1 noisy and 0 inconsistent of 3 rows")

    throughput.add_metrics(rows, {"cpu": 0.01}, [], max_spread=1.0)      # --max-spread
    assert noisy["flag"] == ""
    baseline_noisy = [_row("bn", "native", [2.0, 4.0, 2.0])]              # a baseline: its own times
    throughput.add_metrics(baseline_noisy, {"cpu": 0.01}, [])
    assert baseline_noisy[0]["flag"] == "noisy (spread 100%)"


@pytest.mark.parametrize("fwd, bwd, whole, flagged", [
    ([10, 10, 10], [3, 3, 3], [4, 4, 4], "fwd"),         # conv+bn forward 55.8 ms, fwd+bwd 4.3 ms
    ([1, 1, 1], [10, 10, 10], [5, 5, 5], "bwd"),
    ([10, 10, 10], [3, 3, 3], [4, 9.5, 4], None),        # one round within 10%: noise, not flagged
    ([10, 10, 10], [3, 3, 3], [9.5, 9.5, 9.5], None),    # within 10% in every round
    ([4, 4, 4], [3, 3, 3], [7, 7, 7], None),
])
def test_fwd_bwd_consistency(fwd, bwd, whole, flagged):
    rows = [_row("conv+bn", "native", [1.0] * 3, d) for d in cases.DIRECTIONS]
    rows += [_row("conv+cbn", "cpu", times, d) for times, d in zip((fwd, bwd, whole), cases.DIRECTIONS)]
    throughput.add_metrics(rows, {"cpu": 1.0}, [], max_spread=10.0)
    flags = {r["direction"]: r["flag"] for r in rows[3:]}
    if flagged is None:
        assert flags == {d: "" for d in cases.DIRECTIONS}
    else:
        text = f"inconsistent: fwd+bwd < {flagged}"
        assert flags == {d: text if d in ("fwd+bwd", flagged) else "" for d in cases.DIRECTIONS}
        assert report.row_cells(rows[3 + cases.DIRECTIONS.index("fwd+bwd")])[4] == text
        assert "flagged: 0 noisy and 2 inconsistent of 6 rows" in report.flag_summary(rows)


# ----------------------------------------------------------------------------- legend and plot
def test_legend_explains_every_column_and_flag():
    entries = report.legend(5, 0.25, {"cpu": 10.0})
    names = [name for name, _ in entries]
    assert [h for _, h in report.COLUMNS] == names[:len(report.COLUMNS)]
    assert "noisy (spread N%)" in names and "inconsistent: fwd+bwd < fwd" in names
    text = dict(entries)
    assert "lower is better" in text["/BN"] and "Above 100%" in text["%copy"] and "cpu 10.0 GB/s" in text["%copy"]
    assert "25%" in text["noisy (spread N%)"] and "5 alternating round(s)" in text["ms"]
    plain = report.format_legend(entries)
    assert plain.startswith("Legend:") and all(f"  {name}" in plain for name in names)
    assert "- `%copy`: GB/s over" in report.format_legend(entries, markdown=True)


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="needs matplotlib")
def test_plot_reads_like_the_table():
    """One panel per layer, the /BN ratio itself (lower is better, log axis, a line at 1),
    one line per implementation, flagged rows left out."""
    rows = []
    for channels in (8, 16):
        case = cases.Case("cpu", 2, channels, 4, 4, "float32", "nchw")
        for layer, impl, t in [("bn", "native", 2.0), ("stoch_norm", "published", 6.0), ("stoch_norm", "cpu", 1.0),
                               ("bgn", "published", 4.0), ("bgn", "cpu", 1.5), ("conv+bn", "native", 4.0),
                               ("conv+cbn", "cpu", 5.0)]:
            subject = subjects.Subject(layer, impl, forward=None, params=[], backend=None, bytes_source="-")
            rows.append(throughput.row_for(case, subject, "fwd+bwd", [t], None, "-", 1, "timer"))
    throughput.add_metrics(rows, {"cpu": 1.0}, [])
    rows[2]["flag"] = "noisy (spread 50%)"                                   # stoch_norm cpu, first case
    env = dict(devices={"cpu": dict(name="a CPU")}, rounds=5, torch="x", commit="abc", dirty=False)
    from stochnorm_ext.bench import plot
    fig = plot.figure(rows, env)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["cpu: StochNorm\n(1 flagged row not drawn)", "cpu: BGN",
                                               "cpu: conv + CBN step, over conv + BN"]
    assert "lower is better" in axes[0].get_ylabel() and all(ax.get_yscale() == "log" for ax in axes)
    lines = {ax.get_title().split("\n")[0]: {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()
                                             if not ln.get_label().startswith("_")} for ax in axes}
    stoch = lines["cpu: StochNorm"]
    assert stoch["published"] == [3.0, 3.0] and math.isnan(stoch["cpu"][0]) and stoch["cpu"][1] == 0.5
    assert stoch["BatchNorm = 1"] == [1.0, 1.0]
    assert lines["cpu: conv + CBN step, over conv + BN"] == {"cpu": [1.25, 1.25], "conv + BN = 1": [1.0, 1.0]}
    import matplotlib.pyplot as plt
    plt.close(fig)


# ----------------------------------------------------------------------------- no absolute paths
ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(\[=,`])/(?:[^\s/'\"()\[\],:;`]+/)+")


def test_scrub_paths_and_command_line():
    root = environment.REPO_ROOT
    assert environment.scrub_paths(f"failed in {root}/stochnorm_ext/x.py") == "failed in ./stochnorm_ext/x.py"
    assert environment.scrub_paths("see /opt/lib/libfoo.so (here)") == "see .../libfoo.so (here)"
    kept = "GB/s C/4 1/5/15 /BN fwd+bwd https://example.org/a/b"
    assert environment.scrub_paths(kept) == kept
    inside = os.path.join(os.getcwd(), "benchmarks", "RESULTS.md")
    assert environment.command_line(["--markdown", inside, "--json", "/elsewhere/x/out.json",
                                     "--csv=/elsewhere/r.csv"]) == (
        "python -m stochnorm_ext.bench --markdown benchmarks/RESULTS.md --json out.json --csv=r.csv")


def test_no_output_holds_an_absolute_path(tmp_path, capsys, monkeypatch):
    """Every output of a run whose file options are absolute paths, with a backend whose
    unavailability reason names a file of this machine (as an import error does)."""
    real = sx.backends()
    reason = f"cannot import name '_C' from 'stochnorm_ext' ({environment.REPO_ROOT}/stochnorm_ext/__init__.py)"
    monkeypatch.setattr(sx, "backends", lambda: {**real, "cuda": reason})
    paths = {k: str(tmp_path / f"out.{k}") for k in ("json", "csv", "md", "png")}
    plot = ["--plot", paths["png"]] if HAVE_MATPLOTLIB else []
    assert cli.main(TINY + ["--layers", "bgn", "--backends", OUR_FAST, "--json", paths["json"], "--csv", paths["csv"],
                            "--markdown", paths["md"]] + plot) == 0
    captured = capsys.readouterr()
    outputs = {"stdout": captured.out, "stderr": captured.err}
    outputs.update({k: open(p).read() for k, p in paths.items() if k != "png"})
    assert "./stochnorm_ext/__init__.py" in outputs["json"]                 # the reason is kept, scrubbed
    for name, text in outputs.items():
        for machine_path in (str(tmp_path), environment.REPO_ROOT, os.getcwd()):
            assert machine_path not in text, name
        assert not ABSOLUTE_PATH.search(text), (name, ABSOLUTE_PATH.search(text))
    command = json.load(open(paths["json"]))["environment"]["command"]
    assert command.startswith("python -m stochnorm_ext.bench --device cpu") and "--json out.json" in command
    assert "Legend:" in outputs["stdout"] and "Legend:" in outputs["md"] and "- `/BN`: time ratio" in outputs["md"]
    assert "threads: 1 (" in outputs["md"] or "threads: 2 (" in outputs["md"]
