"""The C++ CPU backend against ``stochnorm_ext.reference`` (the executable SPEC.md).

Every layer (StochNorm, BGN with both kinds of grouping, CBN's normalisation step), dtype,
memory format and a set of odd shapes: forward output, gradients of input/weight/bias,
running statistics; plus module-level multi-step state (running statistics, CBN window),
gradcheck, offset data, and the portable (non-AVX2) kernel build. Outputs are poisoned with
NaN by the kernels (tests/conftest.py sets STOCHNORM_EXT_POISON_OUTPUTS=1), so an element a
kernel leaves unwritten fails the comparison.

Tolerances: float64 is compared tightly with the float64 reference; float32 with the float64
reference at 1e-4 relative; bfloat16/float16 relative to the error that PyTorch's own
BatchNorm makes in that dtype on the same data (against float64).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stochnorm_ext as sx
from stochnorm_ext import functional as F
from stochnorm_ext._backend import resolve

from conftest import available

pytestmark = pytest.mark.skipif(not available("cpu", "cpu"), reason="the C++ CPU backend is not available")

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- helpers
def rel_err(got, want) -> float:
    """Max error relative to the reference's largest magnitude, or absolute below magnitude 1
    (an exactly-zero gradient, e.g. BN's dx with 2 values per channel, is all rounding noise).
    NaN if got has NaN (an element a kernel never wrote)."""
    got, want = got.detach().double(), want.detach().double()
    if torch.isnan(got).any():
        return float("nan")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0)) if want.numel() else 0.0


def make_input(master: torch.Tensor, dtype, fmt: str) -> torch.Tensor:
    """A leaf tensor with master's values in ``dtype`` and the layout ``fmt``."""
    t = master.to(dtype)
    if fmt == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    elif fmt == "noncontig":  # permuted strides: neither contiguous nor channels_last
        t = t.transpose(0, -1).contiguous().transpose(0, -1)  # (contiguous anyway if dims are 1)
    elif fmt == "sliced":     # every other element of a wider tensor
        wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
        t = wide[..., 0]
    else:
        t = t.contiguous()
    return t.detach().requires_grad_()


def expected_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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
    """float64 master inputs of one training step of ``layer``."""
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


def run(layer: str, backend: str, case: dict, dtype, fmt: str, training: bool = True, param_dtype=None,
        update_stats: bool = True):
    """One step of ``layer`` on ``backend``: output, gradients and the running statistics after."""
    if param_dtype is None:
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(case["x"], dtype, fmt)
    p = lambda t: None if t is None else t.to(param_dtype).clone()  # noqa: E731
    w, b = p(case["weight"]), p(case["bias"])
    for t in (w, b):
        if t is not None:
            t.requires_grad_()
    rm, rv = p(case["running_mean"]), p(case["running_var"])
    extra = {}
    if layer == "stoch":
        y = F._stoch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, 0.5, case["mask"], None, backend,
                          update_stats=update_stats)
    elif layer.startswith("bgn"):
        y = F._batch_group_norm(x, groups_for(layer, x.shape), rm, rv, w, b, training, 0.1, 1e-5, backend,
                                update_stats=update_stats)
    elif layer == "cbn":
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        impl = resolve(backend, x.device)
        y, mu_t, var_t = impl.cross_iteration_norm(
            x, w, b, rm, rv, case["past_mean"].to(acc), case["past_var"].to(acc), case["past_keep"],
            training, 0.1, 1e-5, update_stats)
        extra = dict(mu_t=mu_t, var_t=var_t)
    else:
        raise ValueError(layer)
    dy = case["dy"].to(dtype).contiguous(memory_format=expected_format(x))
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


FLOAT_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def compare(layer, shape, dtype, fmt, training=True, affine=True, seed=0, param_dtype=None, case=None):
    """Run ``layer`` on the CPU backend and the float64 reference; assert they agree."""
    case = make_case(layer, shape, seed, affine) if case is None else case
    got = run(layer, "cpu", case, dtype, fmt, training, param_dtype)
    # The reference on float64 copies of the same (rounded) values, in the same layout.
    pdt = param_dtype or torch.float64
    ref_case = dict(case, x=case["x"].to(dtype).double(), dy=case["dy"].to(dtype).double(),
                    **{k: None if case[k] is None else case[k].to(pdt).double()
                       for k in ("weight", "bias", "running_mean", "running_var")})
    want = run(layer, "reference", ref_case, torch.float64, fmt, training)

    assert got["y"].dtype == dtype and got["y"].shape == got["x"].shape
    assert got["y"].is_contiguous(memory_format=expected_format(got["x"]))
    assert got["grad_x"].dtype == dtype
    if dtype in LOW_PRECISION:
        bn = bn_low_precision_error(case, dtype)
        # + one rounding of a parameter gradient stored in a low-precision parameter dtype
        floor = torch.finfo(param_dtype).eps if param_dtype in LOW_PRECISION else 1e-3
        tol = {k: 3 * bn[k] + floor for k in bn}
    else:
        tol = {k: FLOAT_TOL[dtype] for k in ("y", "grad_x", "grad_w", "grad_b")}
    for key in ("y", "grad_x", "grad_w", "grad_b"):
        if want[key] is None:
            assert got[key] is None
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
SHAPES_4D = [(4, 3, 5, 5), (2, 7, 3, 4), (1, 17, 2, 3), (8, 5, 1, 1), (3, 16, 4, 4)]
SHAPES_OTHER = [(6, 7), (4, 7, 9), (1, 3, 6), (2, 3, 2, 3, 4), (2, 17, 3, 2, 2)]
LAYERS = ["stoch", "bgn_div", "bgn_mul", "cbn"]


def _formats(shape):
    fmts = ["contiguous", "noncontig"]
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layer,shape,fmt", GRID)
def test_training_step_matches_reference(layer, shape, fmt, dtype):
    compare(layer, shape, dtype, fmt)


LOWP_GRID = [c for c in GRID if c[1] in ((4, 3, 5, 5), (1, 17, 2, 3), (4, 7, 9), (2, 17, 3, 2, 2), (6, 7))
             and c[2] != "noncontig"]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layer,shape,fmt", LOWP_GRID)
def test_low_precision_matches_reference(layer, shape, fmt, dtype):
    compare(layer, shape, dtype, fmt)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_parameters_in_input_dtype(layer, dtype):
    """Affine parameters and running statistics in the input's own (low) precision."""
    compare(layer, (4, 6, 4, 4), dtype, "contiguous", param_dtype=dtype)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_without_affine(layer, fmt):
    compare(layer, (4, 6, 4, 4), torch.float64, fmt, affine=False)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", LAYERS)
def test_eval_matches_reference(layer, fmt):
    """Eval: running statistics (plain BN for StochNorm/CBN, per-group for BGN), nothing updated."""
    got, want = compare(layer, (3, 6, 4, 4), torch.float64, fmt, training=False)
    case = make_case(layer, (3, 6, 4, 4))
    assert torch.equal(got["running_mean"], case["running_mean"])
    assert torch.equal(got["running_var"], case["running_var"])


@pytest.mark.parametrize("layer", ["bgn_div", "bgn_mul"])
def test_bgn_eval_without_running_stats_uses_batch_stats(layer):
    case = make_case(layer, (3, 6, 4, 4))
    outs = []
    for backend in ("cpu", "reference"):
        x = case["x"].clone().requires_grad_()
        y = F.batch_group_norm(x, groups_for(layer, x.shape), None, None, case["weight"], case["bias"],
                               training=False, backend=backend)
        y.backward(case["dy"])
        outs.append((y, x.grad))
    assert rel_err(outs[0][0], outs[1][0]) < 1e-12
    assert rel_err(outs[0][1], outs[1][1]) < 1e-12


@pytest.mark.parametrize("layer", LAYERS)
def test_update_stats_false_leaves_running_stats(layer):
    case = make_case(layer, (3, 6, 4, 4))
    got = run(layer, "cpu", case, torch.float64, "contiguous", update_stats=False)
    assert torch.equal(got["running_mean"], case["running_mean"])
    assert torch.equal(got["running_var"], case["running_var"])


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
    assert rel_err(got["y"], y) < 1e-12
    assert rel_err(got["grad_x"], x.grad) < 1e-10
    assert rel_err(got["grad_w"], w.grad) < 1e-10
    if p == 1.0:
        assert rel_err(got["running_var"], rv) < 1e-12


def test_cbn_empty_window_is_batch_norm():
    case = make_case("cbn", (4, 6, 3, 3), K=0)
    got = run("cbn", "cpu", case, torch.float64, "contiguous")
    x = case["x"].clone().requires_grad_()
    y = TF.batch_norm(x, None, None, case["weight"], case["bias"], training=True, eps=1e-5)
    y.backward(case["dy"])
    assert rel_err(got["y"], y) < 1e-12
    assert rel_err(got["grad_x"], x.grad) < 1e-10


def test_cbn_all_entries_dropped_and_all_kept():
    for keep in (False, True):
        case = make_case("cbn", (4, 6, 3, 3))
        case["past_keep"] = torch.full_like(case["past_keep"], keep)
        got = run("cbn", "cpu", case, torch.float64, "contiguous")
        want = run("cbn", "reference", case, torch.float64, "contiguous")
        for key in ("y", "grad_x", "grad_w", "grad_b"):
            assert rel_err(got[key], want[key]) < 1e-10, key


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_offset_data_float32(layer, fmt):
    """1e4 + randn in float32: the statistics stay accurate (no E[x^2] - E[x]^2 in float32)."""
    shape = (8, 6, 12, 12)
    case = make_case(layer, shape)
    case["x"] = 1e4 + torch.randn(shape, dtype=torch.float64)
    if layer == "cbn":
        case["past_mean"] = case["past_mean"] + 1e4
    got = run(layer, "cpu", case, torch.float32, fmt)
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


def test_long_rows_and_many_blocks():
    """Rows longer than one kernel block, few channels: the blocked two-pass statistics, the
    split of one channel over several tasks, and their merges."""
    for shape, fmt in (((2, 2, 96, 96), "contiguous"), ((2, 3, 64, 64), "channels_last"),
                       ((1, 1, 40000), "contiguous")):
        for layer in ("stoch", "bgn_mul"):
            compare(layer, shape, torch.float32, fmt)


def test_large_channel_count_channels_last():
    compare("stoch", (4, 300, 3, 3), torch.float32, "channels_last")
    compare("bgn_mul", (2, 40, 6, 6), torch.float32, "channels_last")


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck(layer, fmt):
    shape = (3, 4, 2, 2)
    case = make_case(layer, shape)
    x = make_input(case["x"], torch.float64, fmt)
    w = case["weight"].clone().requires_grad_()
    b = case["bias"].clone().requires_grad_()

    def fn(x, w, b):
        rm, rv = case["running_mean"].clone(), case["running_var"].clone()
        if layer == "stoch":
            return F.stoch_norm(x, rm, rv, w, b, training=True, momentum=0.0, mask=case["mask"], backend="cpu")
        if layer.startswith("bgn"):
            return F.batch_group_norm(x, groups_for(layer, shape), rm, rv, w, b, training=True, backend="cpu")
        return resolve("cpu", x.device).cross_iteration_norm(
            x, w, b, rm, rv, case["past_mean"], case["past_var"], case["past_keep"], True, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))


# ----------------------------------------------------------------------------- modules, several steps
def _train_steps(make_module, backend, steps, x_shape, fmt="contiguous", seed=0):
    torch.manual_seed(seed)
    m = make_module(backend).double()
    g = torch.Generator().manual_seed(seed + 1)
    outs = []
    for _ in range(steps):
        x = torch.randn(x_shape, generator=g, dtype=torch.float64)
        if fmt == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = m(x)
        y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64))
        outs.append((y.detach(), x.grad))
    m.eval()
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    outs.append((m(x).detach(), None))
    return m, outs


@pytest.mark.parametrize("kind", ["stoch1d", "stoch2d", "stoch3d", "bgn2d_div", "bgn2d_mul", "bgn1d"])
def test_module_state_after_several_steps(kind):
    shapes = {"stoch1d": (6, 5, 4), "stoch2d": (4, 6, 3, 3), "stoch3d": (2, 4, 2, 3, 2),
              "bgn2d_div": (4, 6, 3, 3), "bgn2d_mul": (4, 6, 4, 4), "bgn1d": (6, 6)}
    makers = {
        "stoch1d": lambda be: sx.StochNorm1d(5, p=0.5, momentum=None, backend=be),
        "stoch2d": lambda be: sx.StochNorm2d(6, p=0.5, backend=be),
        "stoch3d": lambda be: sx.StochNorm3d(4, p=0.3, backend=be),
        "bgn2d_div": lambda be: sx.BatchGroupNorm2d(6, num_groups=2, backend=be),
        "bgn2d_mul": lambda be: sx.BatchGroupNorm2d(6, num_groups=24, backend=be),
        "bgn1d": lambda be: sx.BatchGroupNorm1d(6, num_groups=3, backend=be),
    }
    m_cpu, out_cpu = _train_steps(makers[kind], "cpu", 4, shapes[kind])
    m_ref, out_ref = _train_steps(makers[kind], "reference", 4, shapes[kind])
    for (y1, g1), (y2, g2) in zip(out_cpu, out_ref):
        assert rel_err(y1, y2) < 1e-10
        if g1 is not None:
            assert rel_err(g1, g2) < 1e-10
    for name, buf in m_ref.state_dict().items():
        assert rel_err(m_cpu.state_dict()[name], buf) < 1e-10, name
    assert rel_err(m_cpu.weight.grad, m_ref.weight.grad) < 1e-10


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_cbn_window_state_after_several_steps(fmt):
    """CBN bound to a conv: outputs, gradients (input, conv weight, affine), running statistics
    and every window buffer over burn-in, filling and wrapping of the ring buffer."""
    def make(backend):
        torch.manual_seed(3)
        return sx.Conv2dCBN(3, 6, 3, padding=1, window=3, burnin=1, backend=backend)

    results = []
    for backend in ("cpu", "reference"):
        m = make(backend).double()
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(7)
        outs = []
        for _ in range(4):
            x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            opt.zero_grad()
            y = m(x)
            y.backward(torch.randn(y.shape, generator=g, dtype=torch.float64))
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


def test_module_default_backend_is_cpu():
    assert sx.backends()["cpu"] is None
    from stochnorm_ext import _backend, _backend_cpu
    assert resolve(None, torch.device("cpu")) is _backend_cpu or os.environ.get(_backend.ENV_VAR)


def test_empty_batch():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    m = sx.StochNorm2d(4, backend="cpu")
    y = m(x)
    assert y.shape == x.shape


# ----------------------------------------------------------------------------- fuzzing
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 4), C=st.integers(1, 19), spatial=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       layer=st.sampled_from(LAYERS), fmt=st.sampled_from(["contiguous", "channels_last", "noncontig"]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_shapes(N, C, spatial, layer, fmt, seed):
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
    if fmt == "noncontig" and all(s == 1 for s in shape):
        fmt = "contiguous"
    make_case(layer, shape, seed)  # exercises the case builder
    compare(layer, shape, torch.float64, fmt, seed=seed)


# ----------------------------------------------------------------------------- portable kernels
_PORTABLE_SCRIPT = r"""
import torch, sys
sys.path[:0] = [{tests!r}, {repo!r}]
import test_cpu_backend as t
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
for layer in t.LAYERS:
    for shape, fmt in (((4, 3, 5, 5), "contiguous"), ((2, 17, 4, 4), "channels_last"), ((6, 7), "contiguous")):
        if layer == "cbn" and len(shape) != 4 or layer == "bgn_mul" and len(shape) == 2:
            continue
        for dtype in (torch.float64, torch.bfloat16):
            t.compare(layer, shape, dtype, fmt)
print("ok")
"""


def test_portable_kernel_build():
    """The non-AVX2 build of the kernels (ATEN_CPU_CAPABILITY=default selects it, as for ATen)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = _PORTABLE_SCRIPT.format(tests=tests_dir, repo=os.path.dirname(tests_dir))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tests_dir)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr
