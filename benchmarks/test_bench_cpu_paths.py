"""pytest-benchmark timings of the CPU paths: fwd+bwd of each layer with the default CPU
backend (the C++ kernels when built, else the reference) and of native BatchNorm, on one
small shape. Quick on purpose (a few rounds each); ``python -m stochnorm_ext.bench`` is the
full benchmark. Run with ``pytest benchmarks/`` (not part of the default ``tests/`` run).
"""
import pytest
import torch

from stochnorm_ext.bench import cases, subjects, timing

CASE = cases.Case("cpu", batch=8, channels=32, height=16, width=16, dtype="float32",
                  memory_format="nchw")
# (layer, impl) as subjects.build_subjects names them; None is the default backend.
SUBJECTS = [("bn", "native"), ("stoch_norm", None), ("bgn", None), ("cbn", None),
            ("conv+bn", "native"), ("conv+cbn", None)]


@pytest.mark.parametrize("layer, impl", SUBJECTS,
                         ids=[f"{layer}-{impl or 'default'}" for layer, impl in SUBJECTS])
def test_fwd_bwd(benchmark, layer, impl):
    built = subjects.build_subjects(CASE, cases.LAYERS, [None], bn_kind="native")
    subject = next(s for s in built if (s.layer, s.impl) == (layer, impl))
    channels = cases.conv_in_channels(CASE.channels, "1x1") if subject.conv_input else CASE.channels
    step = timing.direction_step(subject, timing.make_inputs(CASE, channels, copies=1), "fwd+bwd")
    benchmark.group = f"fwd+bwd {CASE.label}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    # Warm-up rounds also fill CBN's window (4 steps) before the timed rounds.
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=cases.CBN_WINDOW)
