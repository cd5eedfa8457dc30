"""The tests the two C++ backends share, against ``stochnorm_ext.reference`` (the executable docs/SPEC.md).

Not collected by itself (the name does not start with ``test_``): tests/test_cpu_backend.py
and tests/test_cuda_backend.py import every test below and define the ``device`` fixture
they take, ``"cpu"`` (the cpu backend on CPU tensors) or ``"cuda"`` (the cuda backend on
CUDA tensors, skipped with a reason without a GPU). The C++ backends are named after their
device, so ``device`` picks both the tensors' device and the backend under test.

Every layer (StochNorm, BGN with both kinds of grouping, CBN's normalisation step), dtype
(float64, float32, bfloat16, float16), memory format (contiguous, channels_last,
channels_last_3d, permuted strides, sliced, misaligned by a storage offset so that the
kernels take their scalar path) and a set of edge shapes (1x1 spatial, N = 1, C = 3/7/17,
(N, C), (N, C, L), 3d, long rows that the kernels split over many blocks): forward output,
gradients of input/weight/bias, running statistics; module state over several steps
(running statistics, CBN window); gradcheck; offset data (1e4 + randn); the four core ops
against ATen; fuzzed shapes. Outputs are poisoned with NaN by the kernels
(tests/conftest.py sets STOCHNORM_EXT_POISON_OUTPUTS=1), so an element a kernel leaves
unwritten fails the comparison.

Tolerances: float64 is compared tightly with the float64 reference; float32 with the float64
reference at 1e-4 relative; bfloat16/float16 relative to the error that PyTorch's own
BatchNorm makes in that dtype on the same data (against float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stochnorm_ext as sx
from stochnorm_ext import functional as F
from stochnorm_ext.backend import resolve
# The memory format the kernels give an output (the library's rule, also used by _ops.py).
from stochnorm_ext._checks import memory_format_of as expected_format

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
FLOAT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
LAYERS = ["stoch", "bgn_div", "bgn_mul", "cbn"]


# ----------------------------------------------------------------------------- helpers
def backend_of(device) -> str:
    """The C++ backend that runs on ``device`` ("cpu" or "cuda", also for "cuda:1")."""
    return torch.device(device).type


def rel_err(got, want) -> float:
    """Max error relative to the reference's largest magnitude, or absolute below magnitude 1
    (an exactly-zero gradient, e.g. BN's dx with 2 values per channel, is all rounding noise).
    NaN if got has NaN (an element a kernel never wrote). Compared on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if torch.isnan(got).any():
        return float("nan")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0)) if want.numel() else 0.0


def make_input(master: torch.Tensor, dtype, fmt: str, device="cpu") -> torch.Tensor:
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


def to_device(t, dtype=None, device="cpu"):
    if t is None:
        return None
    return t.to(device=device, dtype=dtype or t.dtype).clone()


def smallest_factor(n: int) -> int:
    return next(f for f in range(2, n + 1) if n % f == 0)


def groups_for(layer: str, shape) -> int:
    C, S = shape[1], 1
    for s in shape[2:]:
        S *= s
    if layer == "bgn_div":     # groups of whole channels (G = 1 for a prime C)
        return C // smallest_factor(C) if C > 1 else 1
    if layer == "bgn_mul":     # each channel cut into m spatial pieces
        return C * smallest_factor(S)
    raise ValueError(layer)


def make_case(layer: str, shape, seed: int = 0, affine: bool = True, K: int = 3):
    """float64 master inputs (on the CPU) of one training step of ``layer``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    C = shape[1]
    stats = groups_for(layer, shape) if layer.startswith("bgn") else C
    case = dict(x=r(*shape) * 1.5 + 0.3, dy=r(*shape), weight=1 + 0.3 * r(C) if affine else None,
                bias=0.2 * r(C) if affine else None, running_mean=0.2 * r(stats),
                running_var=0.5 + r(stats).abs())
    if layer == "stoch":
        case["mask"] = torch.rand(C, generator=g) < 0.5
    if layer == "cbn":
        xm = case["x"].mean([0] + list(range(2, len(shape))))
        case["past_mean"] = xm + 0.1 * r(K, C)
        case["past_var"] = 2.25 * (1 + 0.2 * r(K, C).abs())
        case["past_keep"] = torch.rand(K, C, generator=g) < 0.7
    return case


def run(layer: str, backend: str, case: dict, dtype, fmt: str, device="cpu", training: bool = True,
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
        y = F.run_stoch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, 0.5, case["mask"].to(device), None, backend,
                          update_stats=update_stats)
    elif layer.startswith("bgn"):
        y = F.run_batch_group_norm(x, groups_for(layer, x.shape), rm, rv, w, b, training, 0.1, 1e-5, backend,
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


def bn_low_precision_error(case, dtype):
    """PyTorch's BatchNorm error in ``dtype`` (vs float64) on this case's data: the yardstick
    for low-precision tolerances."""
    out = {}
    runs = []
    for dt in (dtype, torch.float64):
        x = case["x"].to(dtype).to(dt).requires_grad_()
        pdt = torch.float32 if dt != torch.float64 else torch.float64
        w = (case["weight"] if case["weight"] is not None else torch.ones(x.shape[1])).to(pdt).requires_grad_()
        b = (case["bias"] if case["bias"] is not None else torch.zeros(x.shape[1])).to(pdt).requires_grad_()
        y = TF.batch_norm(x, None, None, w, b, training=True)
        y.backward(case["dy"].to(dtype).to(dt))
        runs.append(dict(y=y, grad_x=x.grad, grad_w=w.grad, grad_b=b.grad))
    for key in runs[0]:
        out[key] = rel_err(runs[0][key], runs[1][key])
    return out


def compare(device, layer, shape, dtype, fmt, training=True, affine=True, seed=0, param_dtype=None, case=None):
    """Run ``layer`` on the C++ backend of ``device`` and the float64 reference (on the CPU, in
    the same layout); assert they agree."""
    case = make_case(layer, shape, seed, affine) if case is None else case
    got = run(layer, backend_of(device), case, dtype, fmt, device, training, param_dtype)
    # The reference on float64 copies of the same (rounded) values.
    pdt = param_dtype or torch.float64
    ref_case = dict(case, x=case["x"].to(dtype).double(), dy=case["dy"].to(dtype).double(),
                    **{k: None if case[k] is None else case[k].to(pdt).double()
                       for k in ("weight", "bias", "running_mean", "running_var")})
    want = run(layer, "reference", ref_case, torch.float64, fmt, "cpu", training)

    assert got["y"].device.type == backend_of(device) and got["y"].dtype == dtype
    assert got["y"].shape == got["x"].shape
    assert got["y"].is_contiguous(memory_format=expected_format(got["x"]))
    assert got["grad_x"].dtype == dtype and got["grad_x"].shape == got["x"].shape
    if dtype in LOW_PRECISION:
        bn = bn_low_precision_error(case, dtype)
        # + one rounding of a parameter gradient stored in a low-precision parameter dtype
        floor = torch.finfo(param_dtype).eps if param_dtype in LOW_PRECISION else 1e-3
        tol = {k: 3 * bn[k] + floor for k in bn}
    else:
        tol = {k: FLOAT_TOL[dtype] for k in ("y", "grad_x", "grad_w", "grad_b")}
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        if want[key] is None:
            assert got[key] is None, key
            continue
        err = rel_err(got[key], want[key])
        assert err <= tol[key], f"{key}: error {err:.3g} > {tol[key]:.3g}"
    stat_tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-4)
    if param_dtype in LOW_PRECISION:
        stat_tol = torch.finfo(param_dtype).eps
    for key in ("running_mean", "running_var", "mu_t", "var_t"):
        if key in want and want[key] is not None:
            assert got[key].dtype == want[key].dtype or dtype != torch.float64
            err = rel_err(got[key], want[key])
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


def _ids(cases):
    return [f"{layer}-{'x'.join(map(str, shape))}-{fmt}" for layer, shape, fmt in cases]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layer,shape,fmt", GRID, ids=_ids(GRID))
def test_training_step_matches_reference(device, layer, shape, fmt, dtype):
    compare(device, layer, shape, dtype, fmt)


LOWP_GRID = [c for c in GRID if c[1] in ((4, 3, 5, 5), (2, 32, 8, 8), (1, 17, 2, 3), (4, 7, 9), (3, 8, 16),
                                         (2, 8, 2, 4, 4), (6, 7), (5, 16), (2, 17, 3, 2, 2))
             and c[2] != "noncontig"]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layer,shape,fmt", LOWP_GRID, ids=_ids(LOWP_GRID))
def test_low_precision_matches_reference(device, layer, shape, fmt, dtype):
    compare(device, layer, shape, dtype, fmt)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sliced_input(device, layer, dtype):
    compare(device, layer, (3, 8, 4, 4), dtype, "sliced")


@pytest.mark.parametrize("C", [6, 8])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_parameters_in_input_dtype(device, layer, dtype, C):
    """Affine parameters and running statistics in the input's own (low) precision."""
    compare(device, layer, (4, C, 4, 4), dtype, "contiguous", param_dtype=dtype)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_without_affine(device, layer, fmt):
    compare(device, layer, (4, 6, 4, 4), torch.float64, fmt, affine=False)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", LAYERS)
def test_eval_matches_reference(device, layer, fmt):
    """Eval: running statistics (plain BN for StochNorm/CBN, per-group for BGN), nothing updated."""
    got, _ = compare(device, layer, (3, 6, 4, 4), torch.float64, fmt, training=False)
    case = make_case(layer, (3, 6, 4, 4))
    assert torch.equal(got["running_mean"].cpu(), case["running_mean"])
    assert torch.equal(got["running_var"].cpu(), case["running_var"])


@pytest.mark.parametrize("layer", LAYERS)
def test_update_stats_false_leaves_running_stats(device, layer):
    case = make_case(layer, (3, 6, 4, 4))
    got = run(layer, backend_of(device), case, torch.float64, "contiguous", device, update_stats=False)
    assert torch.equal(got["running_mean"].cpu(), case["running_mean"])
    assert torch.equal(got["running_var"].cpu(), case["running_var"])


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


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck(device, layer, fmt):
    shape = (3, 4, 2, 2)
    backend = backend_of(device)
    case = make_case(layer, shape)
    x = make_input(case["x"], torch.float64, fmt, device)
    w = to_device(case["weight"], device=device).requires_grad_()
    b = to_device(case["bias"], device=device).requires_grad_()

    def fn(x, w, b):
        rm, rv = to_device(case["running_mean"], device=device), to_device(case["running_var"], device=device)
        if layer == "stoch":
            return F.stoch_norm(x, rm, rv, w, b, training=True, momentum=0.0, mask=case["mask"].to(device),
                                backend=backend)
        if layer.startswith("bgn"):
            return F.batch_group_norm(x, groups_for(layer, shape), rm, rv, w, b, training=True, backend=backend)
        return resolve(backend, x.device).cross_iteration_norm(
            x, w, b, rm, rv, to_device(case["past_mean"], device=device), to_device(case["past_var"], device=device),
            case["past_keep"].to(device), True, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))


# ----------------------------------------------------------------------------- modules, several steps
def _train_steps(make_module, backend, steps, x_shape, fmt, device, seed=0):
    """Both backends run on ``device``: StochNorm's mask is drawn on the input's device, so the
    same seed gives the same masks only on the same device."""
    torch.manual_seed(seed)
    m = make_module(backend).double().to(device)
    g = torch.Generator().manual_seed(seed + 1)
    outs = []
    for _ in range(steps):
        x = make_input(torch.randn(x_shape, generator=g, dtype=torch.float64), torch.float64, fmt, device)
        y = m(x)
        y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(device))
        outs.append((y.detach(), x.grad))
    m.eval()
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).to(device)
    outs.append((m(x).detach(), None))
    return m, outs


@pytest.mark.parametrize("kind", ["stoch1d", "stoch2d", "stoch3d", "bgn2d_div", "bgn2d_mul", "bgn1d", "bgn3d_mul"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_module_state_after_several_steps(device, kind, fmt):
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
    m_dev, out_dev = _train_steps(makers[kind], backend_of(device), 4, shapes[kind], fmt, device)
    m_ref, out_ref = _train_steps(makers[kind], "reference", 4, shapes[kind], fmt, device)
    for (y1, g1), (y2, g2) in zip(out_dev, out_ref):
        assert rel_err(y1, y2) < 1e-10
        if g1 is not None:
            assert rel_err(g1, g2) < 1e-10
    for name, buf in m_ref.state_dict().items():
        assert rel_err(m_dev.state_dict()[name], buf) < 1e-10, name
    assert rel_err(m_dev.weight.grad, m_ref.weight.grad) < 1e-10


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cbn_window_state_after_several_steps(device, fmt):
    """CBN bound to a conv: outputs, gradients (input, conv weight, affine), running statistics
    and every window buffer over burn-in, filling and wrapping of the ring buffer."""
    def make(backend):
        torch.manual_seed(3)
        return sx.Conv2dCBN(3, 6, 3, padding=1, window=3, burnin=1, backend=backend)

    results = []
    for backend in (backend_of(device), "reference"):
        m = make(backend).double().to(device)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7)
        outs = []
        for _ in range(5):
            x = make_input(torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.float64, fmt, device)
            opt.zero_grad()
            y = m(x)
            y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64).to(device))
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


def test_mixed_precision_module(device):
    """A float16 input through a float32 module (the autocast case) against the reference."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6, device=device).half().requires_grad_()
    outs = []
    for backend in (backend_of(device), "reference"):
        torch.manual_seed(1)
        m = sx.StochNorm2d(16, p=0.5, backend=backend).to(device)
        xi = x.detach().clone().requires_grad_()
        y = m(xi)
        y.float().sum().backward()
        outs.append((y.float(), xi.grad.float(), m.running_var.clone()))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 2e-2


# ----------------------------------------------------------------------------- fuzzing
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 4), C=st.integers(1, 19), spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       layer=st.sampled_from(LAYERS), fmt=st.sampled_from(["contiguous", "channels_last", "noncontig"]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_shapes(device, N, C, spatial, layer, fmt, seed):
    shape = (N, C, *spatial)
    S = 1
    for s in spatial:
        S *= s
    if (layer == "cbn" and len(shape) != 4) or (layer == "bgn_mul" and S == 1):
        return
    if layer.startswith("bgn") and N * C * S // groups_for(layer, shape) < 2 or N * S < 2:
        return  # one value per statistic: an error in training
    if fmt == "channels_last" and len(shape) not in (4, 5):
        fmt = "contiguous"
    if fmt == "noncontig" and torch.empty(shape).transpose(0, -1).contiguous().transpose(0, -1).is_contiguous():
        fmt = "contiguous"  # permuting these strides gives a contiguous tensor again (size-1 dims)
    compare(device, layer, shape, torch.float64, fmt, seed=seed)
