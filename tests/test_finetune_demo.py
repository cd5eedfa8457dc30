"""The fine-tuning demo (examples/finetune_digits.py) runs end to end in its smoke mode."""
import math

import pytest

from conftest import load_example, run_example

pytest.importorskip("sklearn")
pytest.importorskip("scipy")


def _load_demo():
    return load_example("finetune_digits")


def test_smoke_run(tmp_path):
    demo = _load_demo()
    plot_path = tmp_path / "plot.png"
    # One thread: these tiny models gain nothing from more, and a busy CI machine makes
    # multi-threaded tiny ops much slower.
    result, printed = run_example(demo, ["--smoke", "--threads", "1", "--out", str(plot_path)])

    acc = result["accuracy"]
    assert list(acc) == [5]
    assert set(acc[5]) == set(demo.METHODS)
    for method, values in acc[5].items():
        assert len(values) == 2, method  # two seeds in smoke mode
        assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in values), (method, values)
    # The standard source model learned digits 0-4 even in the tiny setting (chance: 20 %).
    assert min(result["source_accuracy"]["standard"]) > 60.0
    for method in demo.METHODS:
        assert method in result["table"]
    assert result["table"] in printed and "diff vs plain" in printed
    if result["plot"] is not None:  # matplotlib installed
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_writes_no_plot_unless_asked():
    demo = _load_demo()
    args = demo.parse_args(["--smoke"])
    assert args.out is None and args.seeds == 2 and args.labels == [5]
    assert demo.parse_args([]).out == demo.DEFAULT_PLOT


def test_paired_stats():
    demo = _load_demo()
    s = demo.paired_stats([1.0, 2.0, -1.0, 0.0])
    assert (s["wins"], s["ties"], s["losses"]) == (2, 1, 1)
    assert s["mean"] == pytest.approx(0.5)
    assert s["sign_p"] == pytest.approx(1.0)  # 2 wins of 3 non-ties
    assert 0.0 < s["t_p"] <= 1.0
    assert demo.paired_stats([0.0, 0.0])["t_p"] == 1.0
