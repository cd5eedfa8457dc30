"""The C++ backends' shared tests (collected through tests/cpp_backend_suite.py by tests/test_cpu_backend.py
and tests/test_cuda_backend.py, which give the ``device`` fixture): each layer's
edge cases against the reference or ATen: BGN in eval without running statistics, BGN's group
counts from G = 1 to G = 16 C, StochNorm with all-batch and all-running masks, CBN with an
empty, all-dropped and all-kept window.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

from stochnorm_ext import functional as F
from stochnorm_ext._checks import memory_format_of as expected_format

from cpp_backend_helpers import backend_of, compare, groups_for, make_case, make_input, rel_err, run, to_device


@pytest.mark.parametrize("layer", ["bgn_div", "bgn_mul"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bgn_eval_without_running_stats_uses_batch_stats(device, layer, fmt):
    case = make_case(layer, (3, 6, 4, 4))
    outs = []
    for backend, dev in ((backend_of(device), device), ("reference", "cpu")):
        x = make_input(case["x"], torch.float64, fmt, dev)
        y = F.batch_group_norm(x, groups_for(layer, x.shape), None, None, to_device(case["weight"], device=dev),
                               to_device(case["bias"], device=dev), training=False, backend=backend)
        y.backward(case["dy"].to(dev).contiguous(memory_format=expected_format(x)))
        outs.append((y, x.grad))
    assert rel_err(outs[0][0], outs[1][0]) < 1e-12
    # The CPU kernels have been held to 1e-12 here, the (GPU-unchecked) CUDA ones to 1e-10.
    assert rel_err(outs[0][1], outs[1][1]) < (1e-12 if backend_of(device) == "cpu" else 1e-10)


@pytest.mark.parametrize("groups", [1, 2, 6, 12, 24, 96])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bgn_group_counts(device, groups, fmt):
    """G = 1 (one statistic), G | C, G = C (BatchNorm), G = m * C with m = 2, 4, 16 pieces."""
    shape = (3, 6, 4, 4)
    case = make_case("bgn_div", shape)
    case["running_mean"], case["running_var"] = 0.1 * torch.randn(groups, dtype=torch.float64), \
        0.5 + torch.rand(groups, dtype=torch.float64)
    got = []
    for backend, dev in ((backend_of(device), device), ("reference", "cpu")):
        x = make_input(case["x"], torch.float64, fmt, dev)
        w, b = to_device(case["weight"], device=dev).requires_grad_(), \
            to_device(case["bias"], device=dev).requires_grad_()
        rm, rv = to_device(case["running_mean"], device=dev), to_device(case["running_var"], device=dev)
        y = F.batch_group_norm(x, groups, rm, rv, w, b, training=True, backend=backend)
        y.backward(case["dy"].to(dev).contiguous(memory_format=expected_format(x)))
        got.append([y, x.grad, w.grad, b.grad, rm, rv])
    for a, b in zip(*got):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_stoch_norm_extreme_masks(device, p):
    """p = 1 is BatchNorm (against nn.functional.batch_norm); p = 0 uses the running statistics."""
    C = 5
    case = make_case("stoch", (4, C, 3, 3))
    case["mask"] = torch.full((C,), p == 1.0)
    got, _ = compare(device, "stoch", (4, C, 3, 3), torch.float64, "contiguous", case=case)
    x = case["x"].clone().requires_grad_()
    w, b = case["weight"].clone().requires_grad_(), case["bias"].clone().requires_grad_()
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    y = TF.batch_norm(x, rm, rv, w, b, training=p == 1.0, momentum=0.1, eps=1e-5)
    y.backward(case["dy"])
    assert rel_err(got["y"], y) < 1e-12
    assert rel_err(got["grad_x"], x.grad) < 1e-10
    assert rel_err(got["grad_w"], w.grad) < 1e-10
    if p == 1.0:
        assert rel_err(got["running_var"], rv) < 1e-12


def test_cbn_empty_window_is_batch_norm(device):
    case = make_case("cbn", (4, 6, 3, 3), K=0)
    got = run("cbn", backend_of(device), case, torch.float64, "contiguous", device)
    x = case["x"].clone().requires_grad_()
    y = TF.batch_norm(x, None, None, case["weight"], case["bias"], training=True, eps=1e-5)
    y.backward(case["dy"])
    assert rel_err(got["y"], y) < 1e-12
    assert rel_err(got["grad_x"], x.grad) < 1e-10


@pytest.mark.parametrize("keep", [False, True])
def test_cbn_all_entries_dropped_and_all_kept(device, keep):
    case = make_case("cbn", (4, 6, 3, 3))
    case["past_keep"] = torch.full_like(case["past_keep"], keep)
    got = run("cbn", backend_of(device), case, torch.float64, "contiguous", device)
    want = run("cbn", "reference", case, torch.float64, "contiguous")
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        assert rel_err(got[key], want[key]) < 1e-10, key
    compare(device, "cbn", (4, 6, 3, 3), torch.float64, "channels_last", case=case)
