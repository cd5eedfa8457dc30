"""``python -m stochnorm_ext.bench``: the CLI end to end (tiny, CPU), its byte counts and
table formatting against hand-computed values, and the published-style baselines against
the reference (so the baselines compute the same thing as the layers they are compared to)."""
import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import stochnorm_ext as sx
from stochnorm_ext.bench import baselines, cases, checks, cli, report, subjects, throughput, timing, traffic
from stochnorm_ext import functional as SF


# ----------------------------------------------------------------------------- bytes
def test_minimum_and_two_pass_bytes():
    # 10 float32 values: 40 bytes per tensor.
    assert traffic.minimum_bytes("fwd", 10, 4) == 80        # read x, write y
    assert traffic.minimum_bytes("bwd", 10, 4) == 120       # read x, dy, write dx
    assert traffic.minimum_bytes("fwd+bwd", 10, 4) == 200
    assert traffic.two_pass_bytes("fwd", 10, 4) == 120      # read x twice, write y
    assert traffic.two_pass_bytes("bwd", 10, 4) == 200      # read x, dy twice, write dx
    assert traffic.two_pass_bytes("fwd+bwd", 10, 2) == 160  # bf16


def test_kernel_bytes_asks_the_backend_and_falls_back():
    class Reports:
        @staticmethod
        def bytes_moved(layer, direction, numel, element_size):
            return {"fwd": 2, "bwd": 3}[direction] * numel * element_size + (layer == "batch_group_norm")

    class Silent:
        pass

    class Raises:
        @staticmethod
        def bytes_moved(layer, direction, numel, element_size):
            raise NotImplementedError

    assert traffic.kernel_bytes(Reports, "stoch_norm", "fwd", 100, 4) == 800
    assert traffic.kernel_bytes(Reports, "stoch_norm", "fwd+bwd", 100, 4) == 2000
    assert traffic.kernel_bytes(Reports, "bgn", "bwd", 100, 4) == 1201  # asked as batch_group_norm
    assert traffic.kernel_bytes(Silent, "cbn", "fwd", 100, 4) is None
    assert traffic.kernel_bytes(Raises, "cbn", "fwd", 100, 4) is None


def test_op_bytes_counter_by_hand():
    x = torch.randn(1000)  # 4000 bytes
    with traffic.OpBytesCounter() as c:
        x * 2
    assert c.bytes == 8000                      # read x, write the result
    with traffic.OpBytesCounter() as c:
        x.view(10, 100)
    assert c.bytes == 0                         # a view moves nothing
    y = x.clone()
    with traffic.OpBytesCounter() as c:
        y.add_(1)
    assert c.bytes == 8000                      # read and write y
    with traffic.OpBytesCounter() as c:
        y.copy_(x)
    assert c.bytes == 8000                      # read x, write y (y is not read)

    x = torch.randn(4, 8, 5, 5)                 # 3200 bytes; per-channel tensors 32 bytes
    w, rm, rv = torch.ones(8), torch.zeros(8), torch.ones(8)
    with traffic.OpBytesCounter() as c:
        TF.batch_norm(x, rm, rv, w, w, True)
    # reads x + 4 per-channel tensors, writes y + mean + invstd, and a second pass over x.
    assert c.bytes == (3200 + 4 * 32) + (3200 + 2 * 32) + 3200
    xr = x.clone().requires_grad_()
    y = TF.batch_norm(xr, rm, rv, w, w, True)
    dy = torch.randn_like(y)
    with traffic.OpBytesCounter() as c:
        torch.autograd.grad(y, [xr], dy)
    # reads dy, x + 5 per-channel tensors, writes dx, and a second pass over dy and x.
    assert c.bytes == (2 * 3200 + 5 * 32) + 3200 + 2 * 3200


def test_batch_norm_on_cpu_is_labelled_native():
    assert subjects.batch_norm_kind(torch.randn(2, 4, 3, 3)) == "native"
    assert subjects.batch_norm_kind(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)) == "native"


def test_copies_for_cache():
    MB = 10**6
    assert timing.copies_for_cache(10 * MB, 32 * MB) == 7   # 70 MB >= 2 x 32 MB
    assert timing.copies_for_cache(500 * MB, 32 * MB) == 1
    assert timing.copies_for_cache(1, 32 * MB) == 16          # capped


# ----------------------------------------------------------------------------- metrics and table
def _row(layer, impl, ms, moved=None, source="est", backend=None, direction="fwd"):
    """A result row; ``ms``: one time (one round), a list of per-round times, or None."""
    case = cases.Case("cpu", 2, 16, 8, 8, "float32", "nchw")
    subject = subjects.Subject(layer, impl, forward=None, params=[], backend=backend,
                            bytes_source="-" if layer.startswith("conv+") else source)
    rounds = ms if isinstance(ms, list) else [] if ms is None else [ms]
    return throughput.row_for(case, subject, direction, rounds, moved, source, 1, "timer")


def test_add_metrics_by_hand():
    numel_bytes = 2 * 16 * 8 * 8 * 4            # 8192 bytes per tensor
    rows = [_row("bn", "native", 2.0, 3 * numel_bytes),
            _row("stoch_norm", "reference", 8.0, 10 * numel_bytes, "ops", "reference"),
            _row("stoch_norm", "cpu", 1.0, 2 * numel_bytes, "kernel", "cpu"),
            _row("conv+bn", "native", 4.0, source="-"),
            _row("conv+cbn", "cpu", 6.0, source="-", backend="cpu")]
    results = [checks.CheckResult("cpu", "cpu", "stoch_norm", "stoch_norm", "float32", True, 1e-7, 1e-4),
              checks.CheckResult("cpu", "cpu", "cbn", "cbn", "float32", False, 1e-2, 1e-4)]
    throughput.add_metrics(rows, {"cpu": 0.01}, results)  # copy bandwidth 0.01 GB/s = 1e7 B/s
    bn, ref, ours, conv_bn, conv_cbn = rows
    assert bn["ratio_to_bn"] == 1.0 and bn["ratio_to_reference"] is None
    assert ref["ratio_to_bn"] == 4.0 and ref["ratio_to_reference"] == 1.0
    assert ours["ratio_to_bn"] == 0.5 and ours["ratio_to_reference"] == 0.125
    assert ours["gbps"] == pytest.approx(2 * numel_bytes / 1e-3 / 1e9)
    assert ours["copy_fraction"] == pytest.approx(ours["gbps"] / 0.01)
    assert ours["bytes_vs_minimum"] == 1.0 and ref["bytes_vs_minimum"] == 5.0
    assert ours["check"] == "pass" and ref["check"] == "" and bn["check"] == ""
    assert conv_cbn["ratio_to_bn"] == 1.5                    # against conv+bn, not bn
    assert conv_cbn["gbps"] is None and conv_cbn["bytes_minimum"] is None
    assert conv_cbn["check"] == "FAIL"                       # conv+cbn follows the cbn check


def test_format_value():
    assert report.format_value("time_ms", 1.23456) == "1.235"
    assert report.format_value("time_ms", 1234.56) == "1235"
    assert report.format_value("ratio_to_bn", 1.5) == "1.50"
    assert report.format_value("gbps", 12.345) == "12.3"
    assert report.format_value("copy_fraction", 0.456) == "46%"
    assert report.format_value("gbps", None) == "-"
    assert report.format_value("check", "") == ""


def test_format_table_text_and_markdown():
    numel_bytes = 2 * 16 * 8 * 8 * 4
    rows = [_row("bn", "native", 2.0, 3 * numel_bytes),
            _row("stoch_norm", "cpu", 1.0, 2 * numel_bytes, "kernel", "cpu")]
    rows.append(_row("bgn", "cpu", None, backend="cpu"))
    rows[-1]["error"] = "RuntimeError: boom"
    throughput.add_metrics(rows, {"cpu": 0.01}, [])
    text = report.format_table(rows).splitlines()
    assert text[0] == "== cpu 2x16x8x8 f32 nchw"
    assert text[1].split() == ["layer", "impl", "dir", "ms", "/BN", "spread", "/ref", "GB/s", "%copy",
                               "bytes/min", "bytes", "check"]
    # 2 x 8192 bytes in 1 ms = 0.0164 GB/s = 164% of 0.01 GB/s; one round: no spread
    assert text[3].split() == ["stoch_norm", "cpu", "fwd", "1", "0.50", "-", "-", "0.0", "164%", "1.00", "kernel"]
    assert text[-1].strip() == "error: bgn/cpu fwd: RuntimeError: boom"
    md = report.format_table(rows, markdown=True).splitlines()
    assert md[0] == "#### cpu 2x16x8x8 f32 nchw"
    assert md[2] == "| layer | impl | dir | ms | /BN | spread | /ref | GB/s | %copy | bytes/min | bytes | check |"
    assert md[5] == "| stoch_norm | cpu | fwd | 1 | 0.50 | - | - | 0.0 | 164% | 1.00 | kernel |  |"


def test_update_markdown_replaces_only_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n<!-- bench:cpu:start -->\nold\n<!-- bench:cpu:end -->\n\nafter\n")
    report.update_markdown(str(path), "cpu", "new table")
    report.update_markdown(str(path), "cuda", "gpu table")
    text = path.read_text()
    assert "old" not in text and "new table" in text and "intro" in text and "after" in text
    assert text.index("after") < text.index("<!-- bench:cuda:start -->\ngpu table\n<!-- bench:cuda:end -->")


def test_parse_shape():
    assert cases.parse_shape("64x56x56") == (64, 56, 56)
    with pytest.raises(Exception, match="CxHxW"):
        cases.parse_shape("64x56")
    shapes = cases.parse_shape("resnet50")
    assert len(shapes) == 12 and shapes[0] == (64, 112, 112) and shapes[-1] == (2048, 7, 7)


def test_bgn_group_specs():
    assert [cases.bgn_groups(spec, 64) for spec in ("C/4", "C/16", "c", "C", "2C", "4c")] == [16, 4, 64, 64, 128, 256]
    assert cases.bgn_groups("C/16", 8) == 1                  # never zero groups
    assert cases.bgn_label("C/4") == "bgn" and cases.bgn_label("2c") == "bgn G=2C"
    assert cases.base_layer("bgn G=2C") == "bgn" and cases.base_layer("conv+cbn") == "conv+cbn"
    for bad in ("4", "C/x", "C*2"):
        with pytest.raises(ValueError, match="C/k, C or kC"):
            cases.bgn_groups(bad, 8)
    assert cases.conv_in_channels(64, "1x1") == 16 and cases.conv_in_channels(64, "3x3") == 64


def test_subjects_for_group_specs_and_3x3_conv():
    case = cases.Case("cpu", 2, 8, 4, 4, "float32", "nchw")
    built = subjects.build_subjects(case, cases.LAYERS, ["reference"], "native", groups=["C/4", "2C"], conv="3x3")
    assert [(s.layer, s.impl) for s in built if s.layer.startswith("bgn")] == [
        ("bgn", "published"), ("bgn", "reference"), ("bgn G=2C", "published"), ("bgn G=2C", "reference")]
    assert len(built) == len(subjects.build_subject_names(cases.LAYERS, ["reference"], ["C/4", "2C"]))
    x, dy = timing.make_inputs(case, 8, copies=1)[0]
    for s in built:
        y = s.forward(x)  # conv subjects take C = 8 input channels with a 3x3 conv
        assert y.shape == x.shape, (s.layer, s.impl)
        torch.autograd.grad(y, [x] + s.params, dy)
    # BGN with G = 2C: the group count reaches the kernels (running statistics of 2C groups).
    bgn2c = next(s for s in built if (s.layer, s.impl) == ("bgn G=2C", "reference"))
    assert bgn2c.forward.keywords["num_groups"] == 16 and bgn2c.forward.keywords["rm"].shape == (16,)


def test_dry_run_needs_no_gpu(capsys):
    """The plan of a GPU run on the ResNet-50 shapes (what benchmarks/bench_triton.py planned)."""
    assert cli.main(["--device", "cuda", "--dry-run", "--shapes", "resnet50", "--batches", "2", "8",
                       "--dtypes", "bfloat16", "--memory-formats", "nchw", "channels_last",
                       "--backends", "triton", "--bgn-groups", "C/4", "C"]) == 0
    out = capsys.readouterr().out
    # subjects: bn, stoch_norm x2, bgn x2, bgn G=C x2, cbn, conv+bn, conv+cbn x2
    assert "cuda: 48 cases x 11 subjects x 3 directions x 5 round(s); conv 1x1" in out
    assert "bgn G=C/triton" in out
    # read x + write y = 2 x 2 bytes x 2*64*112*112 values = 6.1 MiB
    assert "2x64x112x112 bf16 nchw" in out and "fwd=6.1MiB bwd=9.2MiB fwd+bwd=15.3MiB" in out
    if not torch.cuda.is_available():
        assert cli.main(["--device", "cuda", "--quick"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(600)
def test_cli_runs_one_case_cuda(tmp_path):
    """A timed GPU case with the Triton backend (bf16, channels_last, the last ResNet-50 shape)."""
    out = tmp_path / "r.json"
    assert cli.main(["--device", "cuda", "--backends", "triton", "--shapes", "2048x7x7", "--batches", "2",
                       "--dtypes", "bfloat16", "--memory-formats", "channels_last", "--rep-ms", "10",
                       "--no-progress", "--json", str(out)]) == 0
    rows = json.load(open(out))["rows"]
    assert rows and all(r["time_ms"] > 0 and not r["error"] for r in rows)


# ----------------------------------------------------------------------------- baselines compute the same thing
def _f64(*shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, dtype=torch.float64) * scale + shift


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_published_stoch_norm_matches_reference(memory_format):
    C = 6
    x = _f64(4, C, 5, 5, scale=2, shift=0.5).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    weight, bias = _f64(C, scale=0.3, shift=1), _f64(C, scale=0.2)
    running = _f64(C, scale=0.1), 1 + _f64(C).abs() * 0.2
    mask = np.array([1, 0, 1, 1, 0, 0])
    outputs = []
    for published in (True, False):
        xi, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        rm, rv = (t.clone() for t in running)
        if published:
            y = baselines.published_stoch_norm(xi, rm, rv, w, b, mask)
        else:
            y = SF.stoch_norm(xi, rm, rv, w, b, training=True, momentum=cases.MOMENTUM, eps=cases.EPS,
                              mask=torch.from_numpy(mask).bool(), backend="reference")
        y.backward(dy)
        outputs.append([y, xi.grad, w.grad, b.grad, rm, rv])
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups_of", ["G|C", "G=2C"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_published_batch_group_norm_matches_reference(groups_of, memory_format):
    C = 8
    G = C // 4 if groups_of == "G|C" else 2 * C
    x = _f64(3, C, 4, 6, scale=2, shift=0.5).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    weight, bias = _f64(C, scale=0.3, shift=1), _f64(C, scale=0.2)
    outputs = []
    for published in (True, False):
        xi, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        rm, rv = torch.zeros(G, dtype=torch.float64), torch.ones(G, dtype=torch.float64)
        if published:
            y = baselines.published_batch_group_norm(xi, G, rm, rv, w, b)
        else:
            y = SF.batch_group_norm(xi, G, rm, rv, w, b, training=True, momentum=cases.MOMENTUM,
                                    eps=cases.EPS, backend="reference")
        y.backward(dy)
        outputs.append([y, xi.grad, w.grad, b.grad, rm, rv])
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_published_conv_cbn_matches_ours_over_steps():
    """Several steps with the conv weight moving in between, so the window's Taylor
    compensation is exercised: output, every gradient and the running statistics agree."""
    torch.manual_seed(3)
    cin, C = 3, 5
    ours = sx.Conv2dCBN(cin, C, 3, padding=1, window=cases.CBN_WINDOW, momentum=cases.MOMENTUM,
                        eps=cases.EPS, backend="reference").double()
    with torch.no_grad():
        ours.norm.weight.copy_(_f64(C, scale=0.3, shift=1))
        ours.norm.bias.copy_(_f64(C, scale=0.2))
    conv_weight = ours.conv.weight.detach().clone().requires_grad_()
    gamma = ours.norm.weight.detach().clone().requires_grad_()
    beta = ours.norm.bias.detach().clone().requires_grad_()
    published = baselines.PublishedConvCBN(conv_weight, gamma, beta, padding=1)
    published.running_mean, published.running_var = (published.running_mean.double(),
                                                      published.running_var.double())
    for step in range(6):
        u = _f64(4, cin, 6, 6, shift=0.3)
        dy = torch.randn(4, C, 6, 6, dtype=torch.float64)
        u_ours, u_pub = u.clone().requires_grad_(), u.clone().requires_grad_()
        y_ours = ours(u_ours)
        y_pub = published(u_pub)
        y_ours.backward(dy)
        y_pub.backward(dy)
        pairs = [(y_pub, y_ours), (u_pub.grad, u_ours.grad), (conv_weight.grad, ours.conv.weight.grad),
                 (gamma.grad, ours.norm.weight.grad), (beta.grad, ours.norm.bias.grad),
                 (published.running_mean, ours.norm.running_mean),
                 (published.running_var, ours.norm.running_var)]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"step {step}: {m}")
        with torch.no_grad():  # an SGD-like move of the conv weight, the same in both
            delta = 0.05 * torch.randn_like(conv_weight)
            conv_weight.add_(delta)
            ours.conv.weight.add_(delta)
        for t in (conv_weight, gamma, beta, *ours.parameters()):
            t.grad = None


# ----------------------------------------------------------------------------- the CLI
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_cli_end_to_end(tmp_path, capsys):
    paths = {k: str(tmp_path / f"out.{k}") for k in ("json", "csv", "png", "md")}
    plot = ["--plot", paths["png"]] if HAVE_MATPLOTLIB else []
    status = cli.main(["--device", "cpu", "--quick", "--shapes", "8x4x4", "--batches", "2",
                         "--min-run-time", "0.002", "--threads", "1", "--no-progress",
                         "--backends", "reference", "cpu",  # Triton under its interpreter is slow
                         "--json", paths["json"], "--csv", paths["csv"], "--markdown", paths["md"]]
                        + plot)
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "PASS cpu  reference stoch_norm" in printed and "== cpu 2x8x4x4 f32 nchw" in printed

    report = json.load(open(paths["json"]))
    rows = report["rows"]
    backends = report["environment"]["devices"]["cpu"]["backends_timed"]
    assert "reference" in backends
    timed = {(r["layer"], r["impl"], r["direction"]) for r in rows}
    for direction in cases.DIRECTIONS:
        assert ("bn", "native", direction) in timed and ("conv+bn", "native", direction) in timed
        for layer in ("stoch_norm", "bgn"):
            assert (layer, "published", direction) in timed
        assert ("conv+cbn", "published", direction) in timed
        for backend in backends:
            for layer in ("stoch_norm", "bgn", "cbn", "conv+cbn"):
                assert (layer, backend, direction) in timed
    assert all(r["time_ms"] > 0 and not r["error"] for r in rows)
    assert all(c["ok"] for c in report["checks"])
    assert report["environment"]["devices"]["cpu"]["copy_gbps"] > 0

    with open(paths["csv"]) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and "ratio_to_bn" in csv_rows[0]
    md = open(paths["md"]).read()
    assert md.startswith("<!-- bench:cpu:start -->") and "#### cpu 2x8x4x4 f32 nchw" in md
    if HAVE_MATPLOTLIB:
        assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert "![" in md and "out.png" in md


def test_cli_rounds_group_specs_and_3x3_conv(tmp_path, capsys):
    """The options that benchmarks/bench_cpu.py measured with: alternating rounds, BGN with
    G = 2C, conv + CBN with a 3x3 conv from C channels."""
    path = str(tmp_path / "out.json")
    status = cli.main(["--device", "cpu", "--quick", "--shapes", "8x4x4", "--batches", "2", "--skip-checks",
                         "--min-run-time", "0.002", "--threads", "1", "--no-progress", "--backends", "cpu",
                         "--rounds", "2", "--bgn-groups", "C/4", "2C", "--conv", "3x3", "--json", path,
                         "--no-small-batch"])  # the small-batch section: tests/test_bench_small_batch.py
    printed = capsys.readouterr().out
    assert status == 0, printed
    result = json.load(open(path))
    rows = result["rows"]
    assert result["small_batch"] == []
    timed = {(r["layer"], r["impl"]) for r in rows}
    assert {("bgn G=2C", "cpu"), ("bgn G=2C", "published"), ("bgn", "cpu"), ("conv+cbn", "cpu")} <= timed
    assert all(r["time_ms"] > 0 and not r["error"] for r in rows)
    bgn2c = next(r for r in rows if (r["layer"], r["impl"], r["direction"]) == ("bgn G=2C", "cpu", "fwd"))
    assert bgn2c["ratio_to_bn"] is not None and bgn2c["bytes_source"] == "est"
    assert cli.main(["--rounds", "0", "--device", "cpu"]) == 2


def test_cli_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device", "--layers", "--backends", "--shapes", "--batches", "--dtypes",
                   "--memory-formats", "--quick", "--json", "--csv", "--plot", "--markdown",
                   "--bgn-groups", "--conv", "--rounds", "--dry-run"):
        assert option in text
