"""The small-batch section of ``python -m stochnorm_ext.bench``: op counting by hand, the conv
stack and its conversions, the ratio and flag arithmetic on made-up rounds, and the section
end to end in its tiny configuration (table structure, positive integer counts). Nothing
here asserts a speed: speed is a measured claim (benchmarks/RESULTS.md), not a test."""
import csv
import json

import pytest
import torch
from torch import nn

import stochnorm_ext as sx
from stochnorm_ext import bench
from stochnorm_ext.bench import cli, networks, report_small_batch, small_batch
from stochnorm_ext.bench.timing import TimerSettings


class NoProgress:
    def step(self, label):
        pass


# ----------------------------------------------------------------------------- counting
def test_count_ops_by_hand():
    x = torch.randn(4, 5)
    assert bench.count_ops(lambda: x * 2) == 1
    assert bench.count_ops(lambda: x.view(20).permute(0)) == 0          # views are free
    assert bench.count_ops(lambda: (x + 1).sum(), calls=3) == 2
    with bench.OpCounter() as counter:
        y = x.t().contiguous()                                           # a view, then a copy
        y.add_(1)
    assert counter.total == 2 and counter.ops["aten.add_.Tensor"] == 1 and counter.views["aten.t.default"] == 1
    # A module's training forward: BatchNorm dispatches its batch-norm op, an output
    # allocation and the num_batches_tracked increment.
    bn, u = nn.BatchNorm2d(3), torch.randn(2, 3, 2, 2)
    with bench.OpCounter() as counter:
        bn(u)
    assert counter.total == 3 and counter.ops["aten.native_batch_norm.default"] == 1
    # A backward run inside the counter is counted too.
    w = torch.randn(5, requires_grad=True)
    assert bench.count_ops(lambda: torch.autograd.grad((x * w).sum(), [w])) >= 3


def test_count_ops_rejects_calls_that_differ():
    calls = []

    def grows():
        calls.append(1)
        for _ in range(len(calls)):
            torch.ones(2) * 2
    with pytest.raises(RuntimeError, match="differs between calls"):
        bench.count_ops(grows, calls=2)
    with pytest.raises(ValueError, match="calls must be at least 1, got 0"):
        bench.count_ops(grows, calls=0)


def test_our_ops_are_counted_once_each():
    """A compiled op is one dispatched op (what runs inside it is not seen)."""
    layer, u = sx.BatchGroupNorm2d(8, 2, backend="cpu"), torch.randn(2, 8, 2, 2)
    with bench.OpCounter() as counter:
        layer(u)
    assert counter.ops["stochnorm_ext.batch_group_norm_stats.default"] == 1
    assert counter.ops["stochnorm_ext.norm_apply.default"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a CUDA device")
def test_count_launches_needs_cuda():
    with pytest.raises(RuntimeError, match="counted on a CUDA device"):
        bench.count_launches(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_count_launches_by_hand_cuda():
    x = torch.randn(1000, device="cuda")
    x * 2  # warm-up (lazy CUDA initialisation)
    assert bench.count_launches(lambda: x * 2, calls=3) == 1
    assert bench.count_launches(lambda: x.view(10, 100)) == 0
    assert bench.count_launches(lambda: (x + 1) * 2) == 2


# ----------------------------------------------------------------------------- networks
def test_conv_stack_has_resnet18_widths_and_strides():
    model = bench.conv_stack()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    kinds = [type(m) for m in model][:24]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 8
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    assert networks.resnet18_strides((4, 8, 8, 16)) == (1, 2, 1, 2)
    with pytest.raises(ValueError, match="one stride per width"):
        bench.conv_stack((4, 8), strides=(1,))
    with pytest.raises(ValueError, match="positive channel counts"):
        bench.conv_stack((4, 0))


@pytest.mark.parametrize("layer,kind", [("stoch_norm", sx.StochNorm2d), ("bgn G=C/4", sx.BatchGroupNorm2d),
                                        ("bgn G=1", sx.BatchGroupNorm2d),
                                        ("cbn", sx.CrossIterationBatchNorm2d)])
def test_with_layer_converts_every_batchnorm_of_a_copy(layer, kind):
    base = bench.conv_stack((4, 8, 8))
    model = bench.with_layer(base, layer, backend="reference")
    norms = [m for m in model.modules() if isinstance(m, kind)]
    assert len(norms) == 3 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in base.modules()) == 3   # the original is untouched
    if layer.startswith("bgn"):
        assert [m.num_groups for m in norms] == ([1, 2, 2] if layer == "bgn G=C/4" else [1, 1, 1])
    step = bench.training_step(model, (2, 3, 8, 8))
    losses = [step().item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_with_layer_rejects_unknown_layers():
    with pytest.raises(ValueError, match="layer must be"):
        bench.with_layer(bench.conv_stack((4,)), "group_norm")
    with pytest.raises(ValueError, match="C/k or a group count"):
        bench.with_layer(bench.conv_stack((4,)), "bgn G=C*2")


def test_resnet18_converts_to_cbn_and_trains():
    """CBN is the conversion resnet18 can break (every conv -> BN pair found, the downsample
    branches included); the others are per-module swaps, tested on the conv stack above."""
    resnet = networks.torchvision_resnet18()
    if resnet is None:
        pytest.skip("torchvision does not import")
    model = bench.with_layer(resnet, "cbn", backend="cpu")
    assert sum(isinstance(m, sx.CrossIterationBatchNorm2d) for m in model.modules()) == 20
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    step = bench.training_step(model, (2, 3, 32, 32))
    assert torch.isfinite(step())  # one step: each costs about a second of CPU today


# ----------------------------------------------------------------------------- metrics and tables
def _row(section, layer, impl, direction, times, baseline=False, case="2x8x2x2 f32", ops=3):
    return dict(section=section, device="cpu", case=case, layer=layer, impl=impl, direction=direction,
                backend=None if baseline else impl, baseline=baseline, time_ms=sorted(times)[len(times) // 2],
                round_times_ms=list(times), ops=ops, launches=None, timer="t", error="")


def test_ratios_and_flags_by_hand():
    rows = [_row("per-call", "bn", "native", "fwd", [1.0, 1.0, 1.0], baseline=True),
            _row("per-call", "bn", "native", "fwd+bwd", [2.0, 2.0, 2.0], baseline=True),
            _row("per-call", "stoch_norm", "cpu", "fwd", [3.0, 3.0, 3.0]),
            _row("per-call", "stoch_norm", "cpu", "fwd+bwd", [2.0, 2.0, 2.0]),        # below its own fwd
            _row("per-call", "conv+bn", "native", "fwd", [2.0, 2.0, 2.0], baseline=True),
            _row("per-call", "conv+cbn", "cpu", "fwd", [4.0, 8.0, 4.0]),              # spread 100%
            _row("network", "bn", "native", "step", [10.0, 10.0, 10.0], baseline=True, case="net"),
            _row("network", "cbn", "cpu", "step", [15.0, 15.0, 15.0], case="net")]
    small_batch.add_small_batch_metrics(rows, max_spread=0.25)
    bn, _, stoch, stoch_both, conv_bn, cbn, net_bn, net_cbn = rows
    assert bn["ratio_to_bn"] == 1.0 and stoch["ratio_to_bn"] == 3.0 and net_cbn["ratio_to_bn"] == 1.5
    assert conv_bn["ratio_to_bn"] == 1.0                                           # its own baseline, not bn
    assert cbn["ratio_to_bn"] == 2.0 and cbn["flag"] == "noisy (spread 100%)"     # against conv+bn
    assert stoch["flag"] == stoch_both["flag"] == "inconsistent: fwd+bwd < fwd"
    assert net_bn["flag"] == "" and net_cbn["spread"] == 0.0
    text = report_small_batch.format_tables(rows).splitlines()
    assert text[0] == "== cpu small batch, per call: 2x8x2x2 f32"
    assert text[1].split() == ["layer", "impl", "dir", "us", "/BN", "spread", "ops", "launches"]
    assert text[2].split() == ["bn", "native", "fwd", "1000", "1.00", "0%", "3", "-"]
    md = report_small_batch.format_tables(rows, markdown=True)
    assert "#### cpu small batch, training step: net" in md
    assert "| layer | impl | ms | /BN | spread | ops | launches |" in md
    assert "| cbn | cpu | 15 | 1.50 | 0% | 3 | - |" in md


def test_legend_explains_every_column():
    entries = dict(report_small_batch.legend(5, 0.25, ["cpu"]))
    named = {part.strip() for name in entries for part in name.split("/") if name != "/BN"} | {"/BN"}
    for _, header in report_small_batch.CALL_COLUMNS + report_small_batch.NETWORK_COLUMNS:
        assert header in named, header
    assert "had no CUDA device" in entries["launches"]
    assert "had no CUDA device" not in dict(report_small_batch.legend(5, 0.25, ["cpu", "cuda"]))["launches"]


# ----------------------------------------------------------------------------- the section end to end
def test_section_tiny_config_counts_are_positive_integers():
    config = small_batch.SmallBatchConfig(network_input=(2, 3, 8, 8), widths=(4, 4, 8), resnet18_input=None)
    rows = small_batch.run_small_batch("cpu", ["stoch_norm", "bgn", "cbn"], ["cpu"],
                                       TimerSettings("cpu", min_run_time_s=0.001), NoProgress(), rounds=1,
                                       config=config)
    per_call = [r for r in rows if r["section"] == "per-call"]
    network = [r for r in rows if r["section"] == "network"]
    assert {(r["layer"], r["impl"]) for r in per_call} == set(
        (layer, "native" if impl == "baseline" else impl)
        for layer, impl in small_batch.call_subject_names(["stoch_norm", "bgn", "cbn"], ["cpu"]))
    assert all({r["direction"] for r in per_call if r["layer"] == layer} == set(small_batch.CALL_DIRECTIONS)
               for layer in {r["layer"] for r in per_call})
    assert [r["layer"] for r in network] == ["bn", "stoch_norm", "bgn G=C/4", "bgn G=1", "cbn"]
    for r in rows:
        assert not r["error"], r
        assert isinstance(r["ops"], int) and r["ops"] > 0, r
        assert r["launches"] is None                      # no CUDA here: not counted
        assert r["time_ms"] > 0 and len(r["round_times_ms"]) == 1
    assert len(rows) == small_batch.planned_timings(["stoch_norm", "bgn", "cbn"], ["cpu"], config)


def test_cli_small_batch_only(tmp_path, capsys):
    paths = {k: str(tmp_path / f"out.{k}") for k in ("json", "csv", "md")}
    status = cli.main(["--device", "cpu", "--small-batch-only", "--quick", "--skip-checks", "--threads", "1",
                       "--min-run-time", "0.001", "--rounds", "2", "--no-progress", "--backends", "cpu",
                       "--layers", "stoch_norm", "cbn", "--json", paths["json"], "--csv", paths["csv"],
                       "--markdown", paths["md"]])
    printed = capsys.readouterr().out
    assert status == 0, printed
    lines = printed.splitlines()
    header = lines.index("== cpu small batch, per call: 2x8x2x2 f32")
    assert lines[header + 1].split() == ["layer", "impl", "dir", "us", "/BN", "spread", "ops", "launches"]
    stack = lines.index("== cpu small batch, training step: conv stack 2x3x16x16")
    assert lines[stack + 1].split() == ["layer", "impl", "ms", "/BN", "spread", "ops", "launches"]
    assert [line.split()[0] for line in lines[stack + 2:stack + 5]] == ["bn", "stoch_norm", "cbn"]
    assert "== cpu 2x" not in printed                    # the main section did not run
    assert "timings: 15 ran, 0 raised" in printed        # 12 per-call rows + 3 network rows

    result = json.load(open(paths["json"]))
    assert result["rows"] == [] and len(result["small_batch"]) == 15
    for r in result["small_batch"]:
        assert isinstance(r["ops"], int) and r["ops"] > 0 and r["launches"] is None
        assert len(r["round_times_ms"]) == 2 and r["spread"] is not None
    with open(str(tmp_path / "out_small_batch.csv")) as f:
        assert len(list(csv.DictReader(f))) == 15
    md = open(paths["md"]).read()
    assert md.startswith("<!-- bench:cpu-small-batch:start -->") and "<!-- bench:cpu:start -->" not in md
    assert "#### cpu small batch, per call: 2x8x2x2 f32" in md and "- `launches`:" in md
    assert "command (from the repository root): `python -m stochnorm_ext.bench --device cpu --small-batch-only" in md


def test_cli_small_batch_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--small-batch-only", "--no-small-batch"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "--small-batch-only" in text and "--no-small-batch" in text
    assert cli.main(["--device", "cpu", "--dry-run", "--small-batch-only", "--backends", "cpu"]) == 0
    out = capsys.readouterr().out
    # per call: bn, stoch_norm, bgn x2, cbn's conv+bn and conv+cbn = 6 subjects x 3 directions;
    # networks: bn + 4 layers, conv stack and resnet18
    assert "small batch: 28 timings x 5 round(s)" in out and "conv stack 8x3x64x64" in out
    assert "subjects:" not in out
