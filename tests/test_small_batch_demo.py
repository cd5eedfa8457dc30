"""The small-batch demo (examples/small_batch_digits.py) runs end to end in its smoke mode."""
import math

import pytest
import torch

from conftest import load_example, run_example

pytest.importorskip("sklearn")


def _load_demo():
    return load_example("small_batch_digits")


def test_smoke_run(tmp_path):
    demo = _load_demo()
    result, printed = run_example(demo, ["--smoke", "--out", str(tmp_path / "plot.png")])
    plot_path = tmp_path / "plot.png"

    acc = result["accuracy"]
    assert list(acc) == [2, 8]
    for b, per_layer in acc.items():
        assert list(per_layer) == list(demo.LAYERS)
        for layer, values in per_layer.items():
            assert len(values) == 2, (b, layer)  # two seeds in smoke mode
            assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values), (b, layer, values)
        # The BatchNorm-equivalent controls follow BatchNorm's trajectory up to float
        # rounding, which 2 short epochs cannot amplify into more than a few test images.
        for control in demo.CONTROLS:
            assert per_layer[control] == pytest.approx(per_layer["bn"], abs=1.0), (b, control)

    # Markdown table: header, rule, one row per layer, 1 + 2 cells per batch size, all filled
    # in except the baseline's differences; no NaN anywhere.
    lines = result["table"].splitlines()
    assert len(lines) == 2 + len(demo.LAYERS)
    for line, layer in zip(lines[2:], demo.LAYERS):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == layer and len(cells) == 1 + 2 * len(acc), line
        assert "nan" not in line.lower(), line
        filled = cells[1::2] if layer == demo.BASELINE else cells[1:]
        assert all("±" in c for c in filled), line
    assert result["table"] in printed
    if result["plot"] is not None:  # matplotlib installed
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_are_paired():
    """One seed gives every layer the same conv and head initialisation."""
    demo = _load_demo()

    def init(layer):
        torch.manual_seed(3)
        model = demo.Net(layer)
        return [p for name, p in model.named_parameters() if p.dim() > 1]  # conv and linear weights

    reference = init("bn")
    assert len(reference) == 4
    for layer in demo.LAYERS:
        weights = init(layer)
        assert len(weights) == len(reference), layer
        assert all(torch.equal(a, b) for a, b in zip(weights, reference)), layer


def test_layer_names():
    demo = _load_demo()
    net = demo.Net("bgn G=C/4")
    assert [m.num_groups for m in net.modules() if hasattr(m, "num_groups")] == [4, 8, 8]
    net = demo.Net("cbn k=8 rho=0", burnin=5)
    norms = [m.norm for m in net.modules() if hasattr(m, "norm")]
    assert [(n.window, n.rho, n.burnin) for n in norms] == [(8, 0.0, 5)] * 3
    net = demo.Net("gn G=C/4")
    assert [m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)] == [4, 8, 8]
    with pytest.raises(ValueError, match="unknown layer"):
        demo.Net("ln")


def test_args():
    demo = _load_demo()
    args = demo.parse_args(["--smoke"])
    assert args.out is None and args.seeds == 2 and args.jobs == 1 and args.train_images == 40
    args = demo.parse_args(["--layers", "gn G=C/4"])
    assert args.out == demo.DEFAULT_PLOT and args.layers == ["bn", "gn G=C/4"]  # bn always runs
    with pytest.raises(SystemExit):
        demo.parse_args(["--batch-sizes", "1"])
