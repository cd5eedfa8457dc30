"""Helpers of the C++ backends' shared tests (tests/cpp_backend_suite.py): one training step of a
layer on a backend and device (``run``), its float64 master inputs (``make_case``), and the
comparison with ``stochnorm_ext.reference`` on the same values (``compare``).

Tolerances: float64 is compared tightly with the float64 reference; float32 with the float64
reference at 1e-4 relative; bfloat16/float16 relative to the error that PyTorch's own
BatchNorm makes in that dtype on the same data (against float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF

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
