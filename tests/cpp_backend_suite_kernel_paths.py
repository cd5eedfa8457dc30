"""The C++ backends' shared tests (collected through tests/cpp_backend_suite.py by tests/test_cpu_backend.py
and tests/test_cuda_backend.py, which give the ``device`` fixture): the kernels'
paths: long rows split over many blocks, offset data (1e4 + randn) in float32, the four core
ops against ATen, empty batches.
"""
from __future__ import annotations

import pytest
import torch

import stochnorm_ext as sx
from stochnorm_ext._checks import memory_format_of as expected_format

from cpp_backend_helpers import ALL_DTYPES, LAYERS, backend_of, compare, make_case, make_input, rel_err, run


# ----------------------------------------------------------------------------- the kernels' paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,fmt", [
    ((2, 2, 96, 96), "contiguous"),     # few long rows: one segment split over many blocks
    ((2, 3, 64, 64), "channels_last"),  # few channels, many positions: split over positions
    ((1, 1, 40000), "contiguous"),      # a single statistic
    ((64, 3, 7, 7), "contiguous"),      # short rows, many samples
    ((128, 512), "contiguous"),         # (N, C): interleaved walk of a contiguous input
    ((4, 300, 3, 3), "channels_last"),  # many channel tiles
    ((2, 40, 6, 6), "channels_last"),   # bgn_mul: interleaved pieces
    ((16, 64, 14, 14), "channels_last"),
    ((16, 64, 14, 14), "offset"),
])
def test_long_rows_and_splits(device, shape, fmt, dtype):
    """Shapes whose launch splits one statistic over many blocks (partials merged by a second
    kernel or task), tiles many channels, or walks interleaved pieces."""
    for layer in ("stoch", "bgn_mul" if len(shape) > 2 else "bgn_div"):
        compare(device, layer, shape, dtype, fmt)


@pytest.mark.parametrize("C", [6, 8])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_offset_data_float32(device, layer, fmt, C):
    """1e4 + randn in float32: the statistics stay accurate (no E[x^2] - E[x]^2 in float32)."""
    shape = (8, C, 12, 12)
    case = make_case(layer, shape)
    case["x"] = 1e4 + torch.randn(shape, dtype=torch.float64)
    if layer == "cbn":
        case["past_mean"] = case["past_mean"] + 1e4
    got = run(layer, backend_of(device), case, torch.float32, fmt, device)
    ref_case = dict(case, x=case["x"].float().double())
    want = run(layer, "reference", ref_case, torch.float64, fmt)
    # Float32 holds 1e4 to +-5e-4, so a float32 mean (the centre every value is taken from) is
    # that far from the float64 one: about 5e-4 standard deviations of error in x - mean, the
    # same size as the rounding of the input itself. A cancelling E[x^2] - E[x]^2 would be off
    # by whole standard deviations.
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        assert rel_err(got[key], want[key]) < 1e-3, key
    # The running variance (about 1) would be swamped by cancellation at 1e8 magnitudes.
    assert rel_err(got["running_var"], want["running_var"]) < 1e-5
    assert rel_err(got["running_mean"], want["running_mean"]) < 1e-6


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pieces", [1, 4])
def test_offset_statistics_accuracy(device, fmt, pieces):
    """segment_stats on 1e4 + randn in float32, against float64 on the same (rounded) values:
    the kernels shift each statistic by one of its own values, so the mean is right to about
    one float32 rounding at 1e4 and m2 to a few float32 roundings of itself."""
    from stochnorm_ext.backend.compiled.ops import ops
    x = make_input(1e4 + torch.randn(8, 8, 12, 12, dtype=torch.float64), torch.float32, fmt, device).detach()
    mean, m2 = ops.segment_stats(x, pieces)
    segs = x.double().cpu().permute(1, 0, 2, 3).reshape(8, 8, pieces, -1).transpose(1, 2).reshape(8, pieces, -1)
    want_mean = segs.mean(-1)
    want_m2 = ((segs - want_mean[..., None]) ** 2).sum(-1)
    assert (mean.double().cpu() - want_mean).abs().max() <= 2e-3  # 2 float32 ulps at 1e4
    assert ((m2.double().cpu() - want_m2).abs() / want_m2).max() <= 2e-5


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("pieces", [1, 2, 4])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_core_ops_match_torch(device, fmt, pieces, dtype):
    """The four core ops directly, against ATen on the same device (float64 sums)."""
    from stochnorm_ext.backend.compiled.ops import ops
    N, C, H, W = 5, 8, 4, 6
    x = make_input(torch.randn(N, C, H, W, dtype=torch.float64) * 2 + 3, dtype, fmt, device).detach()
    dy = make_input(torch.randn(N, C, H, W, dtype=torch.float64), dtype, fmt, device).detach()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, m2 = ops.segment_stats(x, pieces)
    segs = x.double().permute(1, 0, 2, 3).reshape(C, N, pieces, -1).transpose(1, 2).reshape(C, pieces, -1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert mean.dtype == m2.dtype == torch.float64 and mean.shape == (C, pieces)  # statistics: float64 tables
    torch.testing.assert_close(mean.double(), segs.mean(-1), **tol)
    torch.testing.assert_close(m2.double(), ((segs - segs.mean(-1, keepdim=True)) ** 2).sum(-1), **tol)
    center = torch.randn(C, pieces, dtype=acc, device=device) + 3
    scale, shift = torch.rand(C, pieces, dtype=acc, device=device) + 0.5, torch.randn(C, pieces, dtype=acc, device=device)
    xs = x.double().reshape(N, C, pieces, -1)
    per = lambda t: t.double()[None, :, :, None]  # noqa: E731
    y = ops.segment_apply(x, center, scale, shift)
    assert y.dtype == dtype and y.is_contiguous(memory_format=expected_format(x))
    want = ((xs - per(center)) * per(scale) + per(shift)).reshape(x.shape)
    out_tol = tol if dtype in (torch.float64, torch.float32) else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.double(), want, **out_tol)
    sum_dy, sum_dy_xc = ops.segment_grad_sums(dy, x, center)
    dys = dy.double().reshape(N, C, pieces, -1)
    torch.testing.assert_close(sum_dy.double(), dys.sum((0, 3)), **tol)
    torch.testing.assert_close(sum_dy_xc.double(), (dys * (xs - per(center))).sum((0, 3)), **tol)
    k = [torch.randn(C, pieces, dtype=acc, device=device) for _ in range(3)]
    dx = ops.segment_grad_apply(dy, x, center, *k)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=expected_format(x))
    want = (per(k[0]) * dys + per(k[1]) * (xs - per(center)) + per(k[2])).reshape(x.shape)
    torch.testing.assert_close(dx.double(), want, **out_tol)


def test_core_ops_empty_batch(device):
    from stochnorm_ext.backend.compiled.ops import ops
    x = torch.empty(0, 4, 3, 3, device=device)
    mean, m2 = ops.segment_stats(x, 1)
    assert mean.shape == (4, 1) and not mean.isnan().any() and not m2.isnan().any()
    y = ops.segment_apply(x, torch.zeros(4, device=device), torch.ones(4, device=device), torch.zeros(4, device=device))
    assert y.shape == x.shape


def test_empty_batch(device):
    x = torch.randn(0, 4, 3, 3, device=device, requires_grad=True)
    m = sx.StochNorm2d(4, backend=backend_of(device)).to(device)
    y = m(x)
    assert y.shape == x.shape
