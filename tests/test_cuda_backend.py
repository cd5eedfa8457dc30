"""The CUDA C++ backend (``csrc/cuda/``) against ``stochnorm_ext.reference`` (the executable SPEC.md).

Every layer (StochNorm, BGN with both kinds of grouping, CBN's normalisation step), dtype
(float64, float32, bfloat16, float16), memory format (contiguous, channels_last,
channels_last_3d, permuted strides, sliced, misaligned by a storage offset so that the
kernels take their scalar path) and a set of edge shapes (1x1 spatial, N = 1, C = 3/7/17,
(N, C), (N, C, L), 3d, long rows that the kernels split over many blocks): forward output,
gradients of input/weight/bias, running statistics; module state over several steps
(running statistics, CBN window); opcheck on the CUDA kernels of every op; offset data
(1e4 + randn); streams and devices; and one tensor past 2^31 elements (only on a GPU with
enough free memory). Outputs are poisoned with NaN by the kernels (tests/conftest.py sets
STOCHNORM_EXT_POISON_OUTPUTS=1), so an element a kernel leaves unwritten fails the comparison.

Without a CUDA device (or without the CUDA kernels) these tests skip, except
``test_walk_check_on_host``, which compiles ``csrc/cuda/tests/walk_check.cpp`` with the host
compiler and replays the kernels' work split and per-thread arithmetic on the CPU.
``STOCHNORM_EXT_CUDA_TESTS_ON=cpu`` runs the whole suite against the CPU backend on CPU
tensors instead: a check of the tests themselves on a machine without a GPU.

Tolerances as in tests/test_cpu_backend.py: float64 tight, float32 1e-4 relative to the
float64 reference, bfloat16/float16 three times PyTorch's own BatchNorm error in that dtype.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as TF

import stochnorm_ext as sx
from stochnorm_ext import functional as F
from stochnorm_ext._backend import resolve

from conftest import available
from test_cpu_backend import LAYERS, bn_low_precision_error, expected_format, groups_for, make_case, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Where the suite runs: the CUDA backend on CUDA tensors, or (for checking the tests without a
# GPU) the CPU backend on CPU tensors.
TARGET = os.environ.get("STOCHNORM_EXT_CUDA_TESTS_ON", "cuda")
if TARGET not in ("cuda", "cpu"):
    raise ValueError(f"STOCHNORM_EXT_CUDA_TESTS_ON must be 'cuda' or 'cpu', got {TARGET!r}")
BACKEND = DEVICE = TARGET


def _skip_reason():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if not available(BACKEND, DEVICE):
        return f"the {BACKEND} backend is not available: {sx.backends()[BACKEND]}"
    return None


_SKIP = _skip_reason()
on_device = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
gpu = pytest.mark.skipif(not torch.cuda.is_available() or _SKIP is not None or DEVICE != "cuda",
                         reason=_SKIP or "needs the CUDA backend on a CUDA device")

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
FLOAT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


# ----------------------------------------------------------------------------- helpers
def make_input(master: torch.Tensor, dtype, fmt: str, device=DEVICE) -> torch.Tensor:
    """A leaf tensor on ``device`` with master's values in ``dtype`` and the layout ``fmt``."""
    t = master.to(device=device, dtype=dtype)
    if fmt == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    elif fmt == "noncontig":  # permuted strides: neither contiguous nor channels_last
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
        assert not t.is_contiguous() or t.numel() <= 1 or t.shape[0] == 1 and t.shape[-1] == 1
    elif fmt == "sliced":  # every other element of a wider tensor
        t = torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    elif fmt == "offset":  # contiguous, but its data starts one element into the storage (not 16-byte aligned)
        flat = torch.empty(t.numel() + 1, dtype=dtype, device=device)
        flat[1:] = t.reshape(-1)
        t = flat[1:].view(t.shape)
        assert t.is_contiguous() and t.data_ptr() % 16 != 0
    else:
        t = t.contiguous()
    return t.detach().requires_grad_()


def to_device(t, dtype=None, device=DEVICE):
    if t is None:
        return None
    return t.to(device=device, dtype=dtype or t.dtype).clone()


def run(layer: str, backend: str, case: dict, dtype, fmt: str, device=DEVICE, training: bool = True,
        param_dtype=None, update_stats: bool = True):
    """One step of ``layer`` on ``backend`` and ``device``: output, gradients and the running statistics after."""
    if param_dtype is None:
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(case["x"], dtype, fmt, device)
    w, b = to_device(case["weight"], param_dtype, device), to_device(case["bias"], param_dtype, device)
    for t in (w, b):
        if t is not None:
            t.requires_grad_()
    rm, rv = to_device(case["running_mean"], param_dtype, device), to_device(case["running_var"], param_dtype, device)
    extra = {}
    if layer == "stoch":
        y = F._stoch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, 0.5, case["mask"].to(device), None, backend,
                          update_stats=update_stats)
    elif layer.startswith("bgn"):
        y = F._batch_group_norm(x, groups_for(layer, x.shape), rm, rv, w, b, training, 0.1, 1e-5, backend,
                                update_stats=update_stats)
    elif layer == "cbn":
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        impl = resolve(backend, x.device)
        y, mu_t, var_t = impl.cross_iteration_norm(
            x, w, b, rm, rv, to_device(case["past_mean"], acc, device), to_device(case["past_var"], acc, device),
            case["past_keep"].to(device), training, 0.1, 1e-5, update_stats)
        extra = dict(mu_t=mu_t, var_t=var_t)
    else:
        raise ValueError(layer)
    dy = case["dy"].to(device=device, dtype=dtype).contiguous(memory_format=expected_format(x))
    y.backward(dy)
    return dict(y=y, grad_x=x.grad, grad_w=None if w is None else w.grad, grad_b=None if b is None else b.grad,
                running_mean=rm, running_var=rv, x=x, **extra)


def compare(layer, shape, dtype, fmt, training=True, affine=True, seed=0, param_dtype=None, case=None):
    """Run ``layer`` on the backend under test and the float64 reference (on the CPU); assert they agree."""
    case = make_case(layer, shape, seed, affine) if case is None else case
    got = run(layer, BACKEND, case, dtype, fmt, DEVICE, training, param_dtype)
    # The reference on float64 copies of the same (rounded) values.
    pdt = param_dtype or torch.float64
    ref_case = dict(case, x=case["x"].to(dtype).double(), dy=case["dy"].to(dtype).double(),
                    **{k: None if case[k] is None else case[k].to(pdt).double()
                       for k in ("weight", "bias", "running_mean", "running_var")})
    want = run(layer, "reference", ref_case, torch.float64, "contiguous", "cpu", training)

    assert got["y"].device.type == DEVICE and got["y"].dtype == dtype and got["y"].shape == got["x"].shape
    assert got["y"].is_contiguous(memory_format=expected_format(got["x"]))
    assert got["grad_x"].dtype == dtype and got["grad_x"].shape == got["x"].shape
    if dtype in LOW_PRECISION:
        bn = bn_low_precision_error(case, dtype)
        floor = torch.finfo(param_dtype).eps if param_dtype in LOW_PRECISION else 1e-3
        tol = {k: 3 * bn[k] + floor for k in bn}
    else:
        tol = {k: FLOAT_TOL[dtype] for k in ("y", "grad_x", "grad_w", "grad_b")}
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        if want[key] is None:
            assert got[key] is None, key
            continue
        err = rel_err(got[key].cpu(), want[key])
        assert err <= tol[key], f"{key}: error {err:.3g} > {tol[key]:.3g}"
    stat_tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-4)
    if param_dtype in LOW_PRECISION:
        stat_tol = torch.finfo(param_dtype).eps
    for key in ("running_mean", "running_var", "mu_t", "var_t"):
        if key in want and want[key] is not None:
            err = rel_err(got[key].cpu(), want[key])
            assert err <= stat_tol, f"{key}: error {err:.3g}"
    return got, want


# ----------------------------------------------------------------------------- the grid
# Shapes chosen for the kernels' paths: odd C and L (scalar access), C and L multiples of 8
# (16-byte packs in both layouts for every dtype), 1x1 spatial (planar rows of one value,
# walked as interleaved), N = 1 with spatial > 1, (N, C) and (N, C, L), 3d.
SHAPES_4D = [(4, 3, 5, 5), (2, 7, 3, 4), (1, 17, 2, 3), (8, 5, 1, 1), (3, 16, 4, 4), (2, 32, 8, 8)]
SHAPES_OTHER = [(6, 7), (5, 16), (4, 7, 9), (1, 3, 6), (3, 8, 16), (2, 3, 2, 3, 4), (2, 17, 3, 2, 2),
                (2, 8, 2, 4, 4)]


def _formats(shape):
    fmts = ["contiguous", "noncontig", "offset"]
    if len(shape) in (4, 5):
        fmts.append("channels_last")
    return fmts


def _grid(shapes, layers):
    for layer in layers:
        for shape in shapes:
            if layer == "cbn" and len(shape) != 4:
                continue  # CBN is a 2d layer
            if layer == "bgn_mul" and all(s == 1 for s in shape[2:]):
                continue  # one position per channel cannot be cut into pieces
            for fmt in _formats(shape):
                yield layer, shape, fmt


GRID = list(_grid(SHAPES_4D + SHAPES_OTHER, LAYERS))


@on_device
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layer,shape,fmt", GRID)
def test_training_step_matches_reference(layer, shape, fmt, dtype):
    compare(layer, shape, dtype, fmt)


LOWP_GRID = [c for c in GRID if c[1] in ((4, 3, 5, 5), (2, 32, 8, 8), (1, 17, 2, 3), (4, 7, 9), (3, 8, 16),
                                         (2, 8, 2, 4, 4), (6, 7), (5, 16)) and c[2] != "noncontig"]


@on_device
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layer,shape,fmt", LOWP_GRID)
def test_low_precision_matches_reference(layer, shape, fmt, dtype):
    compare(layer, shape, dtype, fmt)


@on_device
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sliced_input(layer, dtype):
    compare(layer, (3, 8, 4, 4), dtype, "sliced")


@on_device
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_parameters_in_input_dtype(layer, dtype):
    """Affine parameters and running statistics in the input's own (low) precision."""
    compare(layer, (4, 8, 4, 4), dtype, "contiguous", param_dtype=dtype)


@on_device
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_without_affine(layer, fmt):
    compare(layer, (4, 6, 4, 4), torch.float64, fmt, affine=False)


@on_device
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", LAYERS)
def test_eval_matches_reference(layer, fmt):
    """Eval: running statistics (plain BN for StochNorm/CBN, per-group for BGN), nothing updated."""
    got, _ = compare(layer, (3, 6, 4, 4), torch.float64, fmt, training=False)
    case = make_case(layer, (3, 6, 4, 4))
    assert torch.equal(got["running_mean"].cpu(), case["running_mean"])
    assert torch.equal(got["running_var"].cpu(), case["running_var"])


@on_device
@pytest.mark.parametrize("layer", LAYERS)
def test_update_stats_false_leaves_running_stats(layer):
    case = make_case(layer, (3, 6, 4, 4))
    got = run(layer, BACKEND, case, torch.float64, "contiguous", update_stats=False)
    assert torch.equal(got["running_mean"].cpu(), case["running_mean"])
    assert torch.equal(got["running_var"].cpu(), case["running_var"])


@on_device
@pytest.mark.parametrize("layer", ["bgn_div", "bgn_mul"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bgn_eval_without_running_stats_uses_batch_stats(layer, fmt):
    case = make_case(layer, (3, 6, 4, 4))
    outs = []
    for backend, device in ((BACKEND, DEVICE), ("reference", "cpu")):
        x = make_input(case["x"], torch.float64, fmt, device)
        y = F.batch_group_norm(x, groups_for(layer, x.shape), None, None, to_device(case["weight"], device=device),
                               to_device(case["bias"], device=device), training=False, backend=backend)
        y.backward(case["dy"].to(device).contiguous(memory_format=expected_format(x)))
        outs.append((y.cpu(), x.grad.cpu()))
    assert rel_err(outs[0][0], outs[1][0]) < 1e-12
    assert rel_err(outs[0][1], outs[1][1]) < 1e-10


@on_device
@pytest.mark.parametrize("groups", [1, 2, 6, 12, 24, 96])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_bgn_group_counts(groups, fmt):
    """G = 1 (one statistic), G | C, G = C (BatchNorm), G = m * C with m = 2, 4, 16 pieces."""
    shape = (3, 6, 4, 4)
    case = make_case("bgn_div", shape)
    case["running_mean"], case["running_var"] = 0.1 * torch.randn(groups, dtype=torch.float64), \
        0.5 + torch.rand(groups, dtype=torch.float64)
    got = {}
    for backend, device in ((BACKEND, DEVICE), ("reference", "cpu")):
        x = make_input(case["x"], torch.float64, fmt, device)
        w, b = to_device(case["weight"], device=device).requires_grad_(), \
            to_device(case["bias"], device=device).requires_grad_()
        rm, rv = to_device(case["running_mean"], device=device), to_device(case["running_var"], device=device)
        y = F.batch_group_norm(x, groups, rm, rv, w, b, training=True, backend=backend)
        y.backward(case["dy"].to(device).contiguous(memory_format=expected_format(x)))
        got[backend] = [t.detach().cpu() for t in (y, x.grad, w.grad, b.grad, rm, rv)]
    for a, b in zip(got[BACKEND], got["reference"]):
        assert rel_err(a, b) < 1e-10


@on_device
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_stoch_norm_extreme_masks(p):
    """p = 1 is BatchNorm (against nn.functional.batch_norm); p = 0 uses the running statistics."""
    C = 5
    case = make_case("stoch", (4, C, 3, 3))
    case["mask"] = torch.full((C,), p == 1.0)
    got, _ = compare("stoch", (4, C, 3, 3), torch.float64, "contiguous", case=case)
    x = case["x"].clone().requires_grad_()
    w, b = case["weight"].clone().requires_grad_(), case["bias"].clone().requires_grad_()
    rm, rv = case["running_mean"].clone(), case["running_var"].clone()
    y = TF.batch_norm(x, rm, rv, w, b, training=p == 1.0, momentum=0.1, eps=1e-5)
    y.backward(case["dy"])
    assert rel_err(got["y"].cpu(), y) < 1e-12
    assert rel_err(got["grad_x"].cpu(), x.grad) < 1e-10
    assert rel_err(got["grad_w"].cpu(), w.grad) < 1e-10
    if p == 1.0:
        assert rel_err(got["running_var"].cpu(), rv) < 1e-12


@on_device
def test_cbn_empty_window_and_all_entries_dropped_or_kept():
    case = make_case("cbn", (4, 6, 3, 3), K=0)
    got = run("cbn", BACKEND, case, torch.float64, "contiguous")
    x = case["x"].clone().requires_grad_()
    y = TF.batch_norm(x, None, None, case["weight"], case["bias"], training=True, eps=1e-5)
    y.backward(case["dy"])
    assert rel_err(got["y"].cpu(), y) < 1e-12
    assert rel_err(got["grad_x"].cpu(), x.grad) < 1e-10
    for keep in (False, True):
        case = make_case("cbn", (4, 6, 3, 3))
        case["past_keep"] = torch.full_like(case["past_keep"], keep)
        compare("cbn", (4, 6, 3, 3), torch.float64, "channels_last", case=case)


# ----------------------------------------------------------------------------- the kernels' paths
@on_device
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
def test_long_rows_and_splits(shape, fmt, dtype):
    """Shapes whose launch splits one statistic over many blocks (partials merged by a second
    kernel), tiles many channels, or walks interleaved pieces."""
    for layer in ("stoch", "bgn_mul" if len(shape) > 2 else "bgn_div"):
        compare(layer, shape, dtype, fmt)


@on_device
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_offset_data_float32(layer, fmt):
    """1e4 + randn in float32: the statistics stay accurate (shifted Welford, no E[x^2] - E[x]^2)."""
    shape = (8, 8, 12, 12)
    case = make_case(layer, shape)
    case["x"] = 1e4 + torch.randn(shape, dtype=torch.float64)
    if layer == "cbn":
        case["past_mean"] = case["past_mean"] + 1e4
    got = run(layer, BACKEND, case, torch.float32, fmt)
    ref_case = dict(case, x=case["x"].float().double())
    want = run(layer, "reference", ref_case, torch.float64, "contiguous", "cpu")
    # A float32 mean near 1e4 is only known to +-5e-4 (its rounding): that many standard
    # deviations of error in x - mean, as in the input itself. Cancellation would cost whole ones.
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        assert rel_err(got[key].cpu(), want[key]) < 1e-3, key
    assert rel_err(got["running_var"].cpu(), want["running_var"]) < 1e-5
    assert rel_err(got["running_mean"].cpu(), want["running_mean"]) < 1e-6


@on_device
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pieces", [1, 4])
def test_offset_statistics_accuracy(fmt, pieces):
    """segment_stats on 1e4 + randn in float32, against float64 on the same (rounded) values:
    the kernels shift each statistic by one of its own values, so the mean is right to about
    one float32 rounding at 1e4 and m2 to a few float32 roundings of itself."""
    from stochnorm_ext._ops import ops
    x = make_input(1e4 + torch.randn(8, 8, 12, 12, dtype=torch.float64), torch.float32, fmt).detach()
    mean, m2 = ops.segment_stats(x, pieces)
    segs = x.double().cpu().permute(1, 0, 2, 3).reshape(8, 8, pieces, -1).transpose(1, 2).reshape(8, pieces, -1)
    want_mean = segs.mean(-1)
    want_m2 = ((segs - want_mean[..., None]) ** 2).sum(-1)
    assert (mean.double().cpu() - want_mean).abs().max() <= 2e-3  # 2 float32 ulps at 1e4
    assert ((m2.double().cpu() - want_m2).abs() / want_m2).max() <= 2e-5


@on_device
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("pieces", [1, 2, 4])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_core_ops_match_torch(fmt, pieces, dtype):
    """The four core ops directly, against ATen on the same device (float64 sums)."""
    from stochnorm_ext._ops import ops
    N, C, H, W = 5, 8, 4, 6
    x = make_input(torch.randn(N, C, H, W, dtype=torch.float64) * 2 + 3, dtype, fmt).detach()
    dy = make_input(torch.randn(N, C, H, W, dtype=torch.float64), dtype, fmt).detach()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, m2 = ops.segment_stats(x, pieces)
    segs = x.double().permute(1, 0, 2, 3).reshape(C, N, pieces, -1).transpose(1, 2).reshape(C, pieces, -1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert mean.dtype == acc and mean.shape == (C, pieces)
    torch.testing.assert_close(mean.double(), segs.mean(-1), **tol)
    torch.testing.assert_close(m2.double(), ((segs - segs.mean(-1, keepdim=True)) ** 2).sum(-1), **tol)
    center = torch.randn(C, pieces, dtype=acc, device=DEVICE) + 3
    scale, shift = torch.rand(C, pieces, dtype=acc, device=DEVICE) + 0.5, torch.randn(C, pieces, dtype=acc, device=DEVICE)
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
    k = [torch.randn(C, pieces, dtype=acc, device=DEVICE) for _ in range(3)]
    dx = ops.segment_grad_apply(dy, x, center, *k)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=expected_format(x))
    want = (per(k[0]) * dys + per(k[1]) * (xs - per(center)) + per(k[2])).reshape(x.shape)
    torch.testing.assert_close(dx.double(), want, **out_tol)


@on_device
def test_core_ops_empty_batch():
    from stochnorm_ext._ops import ops
    x = torch.empty(0, 4, 3, 3, device=DEVICE)
    mean, m2 = ops.segment_stats(x, 1)
    assert mean.shape == (4, 1) and not mean.isnan().any() and not m2.isnan().any()
    y = ops.segment_apply(x, torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE))
    assert y.shape == x.shape


# ----------------------------------------------------------------------------- gradcheck
@on_device
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck(layer, fmt):
    shape = (3, 4, 2, 2)
    case = make_case(layer, shape)
    x = make_input(case["x"], torch.float64, fmt)
    w, b = to_device(case["weight"]).requires_grad_(), to_device(case["bias"]).requires_grad_()

    def fn(x, w, b):
        rm, rv = to_device(case["running_mean"]), to_device(case["running_var"])
        if layer == "stoch":
            return F.stoch_norm(x, rm, rv, w, b, training=True, momentum=0.0, mask=case["mask"].to(DEVICE),
                                backend=BACKEND)
        if layer.startswith("bgn"):
            return F.batch_group_norm(x, groups_for(layer, shape), rm, rv, w, b, training=True, backend=BACKEND)
        return resolve(BACKEND, x.device).cross_iteration_norm(
            x, w, b, rm, rv, to_device(case["past_mean"]), to_device(case["past_var"]),
            case["past_keep"].to(DEVICE), True, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))


# ----------------------------------------------------------------------------- modules, several steps
def _train_steps(make_module, backend, steps, x_shape, fmt="contiguous", seed=0):
    """Both backends run on DEVICE: StochNorm's mask is drawn on the input's device, so the
    same seed gives the same masks only on the same device."""
    torch.manual_seed(seed)
    m = make_module(backend).double().to(DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    outs = []
    for _ in range(steps):
        x = torch.randn(x_shape, generator=g, dtype=torch.float64)
        x = make_input(x, torch.float64, fmt)
        y = m(x)
        y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE))
        outs.append((y.detach(), x.grad))
    m.eval()
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).to(DEVICE)
    outs.append((m(x).detach(), None))
    return m, outs


@on_device
@pytest.mark.parametrize("kind", ["stoch1d", "stoch2d", "stoch3d", "bgn2d_div", "bgn2d_mul", "bgn1d", "bgn3d_mul"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_module_state_after_several_steps(kind, fmt):
    shapes = {"stoch1d": (6, 5, 4), "stoch2d": (4, 6, 3, 3), "stoch3d": (2, 4, 2, 3, 2),
              "bgn2d_div": (4, 6, 3, 3), "bgn2d_mul": (4, 6, 4, 4), "bgn1d": (6, 6), "bgn3d_mul": (2, 4, 2, 2, 2)}
    makers = {
        "stoch1d": lambda be: sx.StochNorm1d(5, p=0.5, momentum=None, backend=be),
        "stoch2d": lambda be: sx.StochNorm2d(6, p=0.5, backend=be),
        "stoch3d": lambda be: sx.StochNorm3d(4, p=0.3, backend=be),
        "bgn2d_div": lambda be: sx.BatchGroupNorm2d(6, num_groups=2, backend=be),
        "bgn2d_mul": lambda be: sx.BatchGroupNorm2d(6, num_groups=24, backend=be),
        "bgn1d": lambda be: sx.BatchGroupNorm1d(6, num_groups=3, backend=be),
        "bgn3d_mul": lambda be: sx.BatchGroupNorm3d(4, num_groups=8, backend=be),
    }
    if fmt == "channels_last" and len(shapes[kind]) not in (4, 5):
        pytest.skip("no channels_last form")
    m_dev, out_dev = _train_steps(makers[kind], BACKEND, 4, shapes[kind], fmt)
    m_ref, out_ref = _train_steps(makers[kind], "reference", 4, shapes[kind], fmt)
    for (y1, g1), (y2, g2) in zip(out_dev, out_ref):
        assert rel_err(y1, y2) < 1e-10
        if g1 is not None:
            assert rel_err(g1, g2) < 1e-10
    for name, buf in m_ref.state_dict().items():
        assert rel_err(m_dev.state_dict()[name].double(), buf.double()) < 1e-10, name
    assert rel_err(m_dev.weight.grad, m_ref.weight.grad) < 1e-10


@on_device
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cbn_window_state_after_several_steps(fmt):
    """CBN bound to a conv: outputs, gradients (input, conv weight, affine), running statistics
    and every window buffer over burn-in, filling and wrapping of the ring buffer."""
    def make(backend):
        torch.manual_seed(3)
        return sx.Conv2dCBN(3, 6, 3, padding=1, window=3, burnin=1, backend=backend)

    results = []
    for backend in (BACKEND, "reference"):
        m = make(backend).double().to(DEVICE)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7)
        outs = []
        for _ in range(5):
            x = make_input(torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.float64, fmt)
            opt.zero_grad()
            y = m(x)
            y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE))
            outs.append((y.detach(), x.grad, m.conv.weight.grad.clone(), m.norm.weight.grad.clone()))
            opt.step()
        results.append((m, outs))
    (m1, o1), (m2, o2) = results
    for a, b in zip(o1, o2):
        for t1, t2 in zip(a, b):
            assert rel_err(t1, t2) < 1e-9
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s2:
        if s2[k].is_floating_point():
            assert rel_err(s1[k], s2[k]) < 1e-9, k
        else:
            assert torch.equal(s1[k], s2[k]), k


@on_device
def test_mixed_precision_module():
    """A float16 input through a float32 module (the autocast case) against the reference."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6, device=DEVICE).half().requires_grad_()
    outs = []
    for backend in (BACKEND, "reference"):
        torch.manual_seed(1)
        m = sx.StochNorm2d(16, p=0.5, backend=backend).to(DEVICE)
        xi = x.detach().clone().requires_grad_()
        y = m(xi)
        y.float().sum().backward()
        outs.append((y.float(), xi.grad.float(), m.running_var.clone()))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 2e-2


# ----------------------------------------------------------------------------- ops, dispatch
def _to_device(arg):
    if isinstance(arg, torch.Tensor):
        return arg.detach().to(DEVICE).requires_grad_(arg.requires_grad)
    return arg


@on_device
def test_opcheck_on_device():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on the
    device kernels of every op, with the samples of tests/test_ops.py moved to the device."""
    from test_ops import SAMPLES
    for name in sorted(SAMPLES):
        op = getattr(torch.ops.stochnorm_ext, name).default
        for args in SAMPLES[name]():
            torch.library.opcheck(op, tuple(_to_device(a) for a in args))


@gpu
def test_every_op_has_a_cuda_kernel():
    from stochnorm_ext import _backend_cuda
    assert _backend_cuda.UNAVAILABLE is None
    for name in _backend_cuda.CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stochnorm_ext::{name}", "CUDA"), name


def test_backend_availability_matches_the_build():
    """The cuda backend is available exactly when the extension has CUDA kernels."""
    from stochnorm_ext import _backend_cuda
    try:
        from stochnorm_ext import _ops  # noqa: F401
    except ImportError:
        assert _backend_cuda.UNAVAILABLE
        return
    has = [torch._C._dispatch_has_kernel_for_dispatch_key(f"stochnorm_ext::{n}", "CUDA")
           for n in _backend_cuda.CUDA_OPS]
    assert (_backend_cuda.UNAVAILABLE is None) == all(has)
    assert (sx.backends()["cuda"] is None) == all(has)


@gpu
def test_default_backend_for_cuda_tensors():
    from stochnorm_ext import _backend, _backend_cuda
    if os.environ.get(_backend.ENV_VAR):
        pytest.skip(f"{_backend.ENV_VAR} overrides the default")
    assert resolve(None, torch.device("cuda")) is _backend_cuda


@gpu
def test_tensors_on_other_devices_are_refused():
    from stochnorm_ext._ops import ops
    x = torch.randn(4, 3, 5, 5, device="cuda")
    table = torch.zeros(3)
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.segment_apply(x, table, table, table)
    with pytest.raises(RuntimeError, match="CUDA input"):
        ops.segment_apply(x.cpu(), table.cuda(), table.cuda(), table.cuda())
    with pytest.raises(RuntimeError, match="on cpu"):
        ops.cross_iteration_norm_forward(x, None, None, None, None, torch.zeros(1, 3), torch.ones(1, 3),
                                         torch.ones(1, 3, dtype=torch.bool, device="cuda"), True, 1e-5)
    with pytest.raises(RuntimeError, match="is on cpu"):
        ops.stoch_norm_forward(x, None, None, torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"),
                               torch.ones(3, dtype=torch.bool), 1e-5)


@gpu
def test_side_stream():
    """The kernels run on the current stream: results on a side stream match the default one."""
    case = make_case("bgn_mul", (8, 16, 8, 8))
    want = run("bgn_mul", BACKEND, case, torch.float32, "channels_last")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run("bgn_mul", BACKEND, case, torch.float32, "channels_last")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for key in ("y", "grad_x", "grad_w", "grad_b", "running_mean", "running_var"):
        assert torch.equal(got[key], want[key]), key


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the ops switch device (CUDAGuard)."""
    case = make_case("stoch", (4, 8, 5, 5))
    got = run("stoch", BACKEND, case, torch.float32, "channels_last", device="cuda:1")
    want = run("stoch", BACKEND, case, torch.float32, "channels_last", device="cuda:0")
    assert got["y"].device == torch.device("cuda:1")
    for key in ("y", "grad_x", "grad_w", "running_var"):
        assert rel_err(got[key].cpu(), want[key].cpu()) < 1e-6, key


@gpu
def test_compile_fullgraph():
    """Conv -> StochNorm/BGN -> ReLU under torch.compile(fullgraph=True) matches eager on CUDA."""
    for norm in ("stoch", "bgn_mul"):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3, padding=1).cuda()
        layer = (sx.StochNorm2d(8, p=1.0, backend=BACKEND) if norm == "stoch"
                 else sx.BatchGroupNorm2d(8, num_groups=16, backend=BACKEND)).cuda()
        model = torch.nn.Sequential(conv, layer, torch.nn.ReLU())
        x = torch.randn(4, 3, 8, 8, device="cuda")
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- past 2^31 elements
def _free_gpu_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return free


BIG_GIB = 32


@gpu
@pytest.mark.slow
@pytest.mark.skipif(_free_gpu_bytes() < BIG_GIB * 2 ** 30, reason=f"needs {BIG_GIB} GiB of free GPU memory")
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_more_than_2_31_elements(fmt):
    """64-bit indexing: a float16 tensor of 2^31 + 2^15 elements through the four core ops, checked
    per channel against ATen (statistics) and at the end of the tensor (outputs)."""
    from stochnorm_ext._ops import ops
    torch.manual_seed(0)
    C = 8
    if fmt == "contiguous":
        shape = (2, C, 2 ** 27 + 2 ** 11)           # planar rows of L values
    else:
        shape = (1, C, 2 ** 14, 2 ** 14 + 1)        # interleaved: channels innermost
    x = torch.empty(shape, dtype=torch.float16, device="cuda",
                    memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
    x.normal_()
    x += torch.arange(C, device="cuda", dtype=torch.float16).view(1, C, *([1] * (x.dim() - 2)))
    assert x.numel() > 2 ** 31
    mean, m2 = ops.segment_stats(x, 1)
    count = x.numel() // C
    for c in range(C):
        xc = x[:, c].float()
        var_c, mean_c = torch.var_mean(xc, correction=0)
        assert abs(mean[c, 0].item() - mean_c.item()) < 1e-4 * (abs(mean_c.item()) + 1)
        assert abs(m2[c, 0].item() / count - var_c.item()) < 1e-4 * var_c.item()
        del xc
    center, scale, shift = mean.view(C), torch.rsqrt(m2.view(C) / count + 1e-5), torch.linspace(-1, 1, C, device="cuda")
    y = ops.segment_apply(x, center, scale, shift)
    tail = (slice(None), slice(None)) + (slice(-3, None),) * (x.dim() - 2)
    per = lambda t: t.view(1, C, *([1] * (x.dim() - 2)))  # noqa: E731
    want_tail = ((x[tail].float() - per(center)) * per(scale) + per(shift)).half()
    torch.testing.assert_close(y[tail], want_tail, rtol=2e-3, atol=2e-3)
    del y
    dy = torch.ones_like(x)
    sum_dy, sum_dy_xc = ops.segment_grad_sums(dy, x, center)
    assert torch.allclose(sum_dy.view(C).double(), torch.full((C,), float(count), dtype=torch.float64, device="cuda"),
                          rtol=1e-5)
    assert sum_dy_xc.abs().max().item() < 1e-3 * count  # sum(x - mean) = 0 up to rounding
    dx = ops.segment_grad_apply(dy, x, center, scale, torch.zeros_like(scale), shift)
    want_tail = (per(scale) + per(shift)).expand_as(x[tail]).half()
    torch.testing.assert_close(dx[tail], want_tail, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- host check of the kernels' indexing
def test_walk_check_on_host(tmp_path):
    """csrc/cuda/tests/walk_check.cpp: the CUDA core's work split, indexing and per-thread
    arithmetic replayed on the CPU (no GPU needed)."""
    source = os.path.join(ROOT, "csrc", "cuda", "tests", "walk_check.cpp")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not os.path.exists(source) or compiler is None:
        pytest.skip("needs the repository's csrc/ and a C++ compiler")
    from torch.utils import cpp_extension
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    exe = str(tmp_path / "walk_check")
    build = subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                            *includes, source, f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", exe],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    result = subprocess.run([exe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "all checks passed" in result.stdout, result.stdout[-4000:] + result.stderr
