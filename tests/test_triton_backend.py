"""The Triton backend against the reference (stochnorm_ext.reference) for every layer.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (conftest sets
TRITON_INTERPRET=1 and STOCHNORM_EXT_POISON_OUTPUTS=1, so every output the backend
allocates starts as NaN); with a GPU the same tests also run on CUDA tensors. The
interpreter's cost grows with programs x ops: shapes are small, and a few tests shrink
the tiles (``small_tiles``) so that several channel blocks, tiles per program and split
reductions are exercised on those small shapes.

The reference runs in float64 on the same inputs; float32 is compared tightly, float16 /
bfloat16 against a budget set by PyTorch's own low-precision BatchNorm error.
The ops themselves (schemas, launches, compile) are tested in test_triton_ops.py, the
modules over several steps in test_triton_modules.py.
"""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import stochnorm_ext as sx
from stochnorm_ext import reference

from conftest import DEVICES, available

pytestmark = pytest.mark.timeout(300)


def _device_params():
    params = []
    for device in DEVICES:
        ok = available("triton", device)
        reason = sx.backends()["triton"] or f"the triton backend does not run on {device} here"
        params.append(pytest.param(device, marks=() if ok else pytest.mark.skip(reason=reason)))
    return params


device_param = pytest.mark.parametrize("device", _device_params())


@pytest.fixture
def T():
    from stochnorm_ext.backend import triton
    return triton


@contextlib.contextmanager
def small_tiles(**overrides):
    """Tiny tiles and many programs: several channel blocks, several tiles per program,
    ragged last tiles and split reductions on small shapes."""
    from stochnorm_ext.backend import triton as T
    saved = dict(T.TUNING)
    T.TUNING.update({"tile": 32, "max_block_c": 4, "programs": 6, **overrides})
    try:
        yield
    finally:
        T.TUNING.clear()
        T.TUNING.update(saved)


# ---------------------------------------------------------------------------------------
# Running one layer on both backends
# ---------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "channels_last", "strided")


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other element of a wider tensor
        wide = torch.stack([x, torch.full_like(x, float("nan"))], dim=-1)
        return wide[..., 0]
    return x.contiguous()


class Case:
    """Inputs of one layer call; ``run(backend, dtype)`` returns everything to compare."""

    def __init__(self, layer, shape, device, groups=None, affine=True, past=2, offset=0.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        C = shape[1]
        self.layer, self.C = layer, C
        self.groups = groups if groups is not None else C
        stats = self.groups if layer == "bgn" else C
        self.x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5 + offset
        self.weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if affine else None
        self.bias = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
        self.running_mean = torch.randn(stats, generator=g, dtype=torch.float64) * 0.3 + offset
        self.running_var = torch.rand(stats, generator=g, dtype=torch.float64) + 0.5
        self.mask = torch.rand(C, generator=g) < 0.5
        self.past_mean = torch.randn(past, C, generator=g, dtype=torch.float64) * 0.3 + 0.5 + offset
        self.past_var = torch.rand(past, C, generator=g, dtype=torch.float64) + 1.0
        self.past_keep = torch.rand(past, C, generator=g) < 0.7
        self.grad = torch.randn(shape, generator=g, dtype=torch.float64)
        self.device = device

    def run(self, backend, dtype, layout="contiguous", training=True, param_dtype=None,
            update_stats=True):
        """y, dx, dweight, dbias, running mean/var after the call (and CBN's mu_t, var_t)."""
        dev = self.device if backend == "triton" else "cpu"
        param_dtype = param_dtype or (torch.float64 if backend == "reference" else dtype)
        stat_dtype = torch.float64 if dtype == torch.float64 or backend == "reference" else torch.float32

        def prm(t, dt):
            return None if t is None else t.to(dev, dt, copy=True).requires_grad_()

        x = _layout(self.x.to(dev, dtype, copy=True), layout).requires_grad_()
        weight, bias = prm(self.weight, param_dtype), prm(self.bias, param_dtype)
        rm = self.running_mean.to(dev, torch.float32 if param_dtype != torch.float64 else torch.float64, copy=True)
        rv = self.running_var.to(dev, rm.dtype, copy=True)
        impl = reference if backend == "reference" else importlib.import_module("stochnorm_ext.backend.triton")
        extra = ()
        if self.layer == "stoch":
            y = impl.stoch_norm(x, weight, bias, rm, rv, self.mask.to(dev), training, 0.1, 1e-5, update_stats)
        elif self.layer == "bgn":
            y = impl.batch_group_norm(x, self.groups, weight, bias, rm, rv, training, 0.1, 1e-5, update_stats)
        else:
            y, mu_t, var_t = impl.cross_iteration_norm(
                x, weight, bias, rm, rv, self.past_mean.to(dev, stat_dtype),
                self.past_var.to(dev, stat_dtype), self.past_keep.to(dev), training, 0.1, 1e-5, update_stats)
            extra = (mu_t, var_t)
        assert y.dtype == x.dtype and y.shape == x.shape
        y.backward(self.grad.to(dev, dtype))
        out = dict(y=y, dx=x.grad, running_mean=rm, running_var=rv)
        if weight is not None:
            out.update(dweight=weight.grad, dbias=bias.grad)
        if extra:
            out.update(mu_t=extra[0], var_t=extra[1])
        return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


def _check(got, want, tol, what=""):
    for name, ref in want.items():
        out = got[name]
        assert not torch.isnan(out).any(), f"{what}{name}: NaN (an element was never written)"
        atol = tol[name] if isinstance(tol, dict) else tol
        err = (out - ref).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        assert err <= atol * scale, f"{what}{name}: max error {err:.3g} > {atol:.3g} * {scale:.3g}"


FP32_TOL = 2e-5


def _compare(case, dtype=torch.float32, layout="contiguous", training=True, tol=FP32_TOL, **kw):
    got = case.run("triton", dtype, layout, training, **kw)
    want = case.run("reference", torch.float64, "contiguous", training, update_stats=kw.get("update_stats", True))
    _check(got, want, tol, f"{case.layer} {tuple(case.x.shape)} {dtype} {layout} training={training}: ")
    return got, want


LAYERS = [("stoch", None), ("bgn", 3), ("bgn", 12), ("cbn", None)]  # bgn 3: G | C; 12: G = 2C
LAYER_IDS = ["stoch", "bgn-groups-of-channels", "bgn-pieces-of-channels", "cbn"]


# ---------------------------------------------------------------------------------------
# float32: layouts, training and eval
# ---------------------------------------------------------------------------------------

@device_param
@pytest.mark.parametrize("layer,groups", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_matches_reference(device, layer, groups, layout, training):
    _compare(Case(layer, (4, 6, 4, 3), device, groups), layout=layout, training=training)


@device_param
@pytest.mark.parametrize("layer,groups", [("stoch", None), ("bgn", 2), ("bgn", 8), ("cbn", None)],
                         ids=LAYER_IDS)
def test_channels_last_3d(device, layer, groups):
    _compare(Case(layer, (2, 4, 2, 3, 4), device, groups), layout="channels_last")


@device_param
@pytest.mark.parametrize("shape,groups", [
    ((8, 5, 1, 1), 5),        # 1x1 spatial
    ((1, 3, 4, 5), 6),        # N = 1 with spatial > 1 (G = 2C)
    ((2, 17, 3, 3), 17),      # C not a multiple of any block size
    ((3, 7, 5), 7),           # (N, C, L)
    ((6, 7), 7),              # (N, C)
    ((2, 3, 2, 3, 2), 1),     # 3d; BGN with one group for everything
], ids=["1x1", "N1", "C17", "NCL", "NC", "3d"])
@pytest.mark.parametrize("layer", ["stoch", "bgn", "cbn"])
def test_edge_shapes(device, shape, groups, layer):
    _compare(Case(layer, shape, device, groups if layer == "bgn" else None))


@device_param
@pytest.mark.parametrize("layer,groups", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_split_reductions(device, layer, groups, layout):
    """Tiny tiles: several channel blocks, tiles per program, splits and ragged tiles."""
    with small_tiles():
        _compare(Case(layer, (3, 6, 4, 5) if groups != 12 else (3, 6, 4, 6), device, groups), layout=layout)


@device_param
def test_split_reductions_many_partials(device):
    """More partials per statistic than the finalize kernels read at once."""
    with small_tiles(programs=64):
        _compare(Case("bgn", (4, 4, 6, 6), device, 2))
        _compare(Case("stoch", (5, 3, 7), device), layout="contiguous")


@device_param
@pytest.mark.parametrize("layer,groups", [("stoch", None), ("bgn", 3), ("cbn", None)],
                         ids=["stoch", "bgn", "cbn"])
def test_no_affine_and_no_running_update(device, layer, groups):
    case = Case(layer, (3, 6, 5), device, groups, affine=False)
    got, _ = _compare(case, update_stats=False)
    assert torch.equal(got["running_mean"], case.running_mean.float().double())


@device_param
def test_bgn_without_running_stats_in_eval(device, T):
    """BGN in eval without running statistics normalises with the batch statistics."""
    x = torch.randn(4, 6, 5, device=device, requires_grad=True)
    y = T.batch_group_norm(x, 3, None, None, None, None, False, 0.1, 1e-5)
    x64 = x.detach().cpu().double().requires_grad_()
    want = reference.batch_group_norm(x64, 3, None, None, None, None, False, 0.1, 1e-5)
    g = torch.randn_like(want)
    y.backward(g.to(device, y.dtype))
    want.backward(g)
    _check({"y": y.detach().cpu().double(), "dx": x.grad.cpu().double()}, {"y": want, "dx": x64.grad}, FP32_TOL)


@device_param
def test_stoch_norm_mask_extremes(device):
    """All-batch (BatchNorm) and all-moving masks."""
    for value in (True, False):
        case = Case("stoch", (4, 5, 3), device)
        case.mask = torch.full((5,), value)
        _compare(case)


@device_param
def test_cbn_without_past_entries(device):
    _compare(Case("cbn", (4, 5, 3, 2), device, past=0))


# ---------------------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------------------

def _torch_bn_error(x64, weight64, bias64, grad64, dtype, device):
    """PyTorch's own error for training-mode BatchNorm in ``dtype`` vs float64: y, dx."""
    def bn(dt, dev):
        x = x64.to(dev, dt, copy=True).requires_grad_()
        y = F.batch_norm(x, None, None, weight64.to(dev, dt), bias64.to(dev, dt), training=True)
        y.backward(grad64.to(dev, dt))
        return y.detach().cpu().double(), x.grad.cpu().double()
    (y_lo, dx_lo), (y_hi, dx_hi) = bn(dtype, device), bn(torch.float64, "cpu")
    return (y_lo - y_hi).abs().max().item(), (dx_lo - dx_hi).abs().max().item()


@device_param
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layer,groups", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision(device, dtype, layer, groups, layout):
    """Half-precision input with float32 parameters and buffers (the autocast case). The
    budget: PyTorch's own BatchNorm error in that dtype vs float64 on the same data, plus
    one unit in the last place of the output (the interpreter truncates float32 ->
    bfloat16 instead of rounding)."""
    case = Case(layer, (4, 6, 4, 3), device, groups)
    got = case.run("triton", dtype, layout, param_dtype=torch.float32)
    want = case.run("reference", torch.float64)
    x_q = case.x.to(dtype).double()  # what the kernels see
    bn_y, bn_dx = _torch_bn_error(x_q, case.weight, case.bias, case.grad, dtype, device)
    ulp = torch.finfo(dtype).eps
    ref_q = Case(layer, (4, 6, 4, 3), device, groups)
    ref_q.x = x_q
    want_q = ref_q.run("reference", torch.float64)  # reference on the rounded input
    y_scale = want_q["y"].abs().max().item()
    assert (got["y"] - want_q["y"]).abs().max().item() <= 2 * bn_y + ulp * y_scale
    dx_scale = want_q["dx"].abs().max().item()
    assert (got["dx"] - want_q["dx"]).abs().max().item() <= 2 * bn_dx + ulp * dx_scale
    # Parameter gradients and statistics accumulate in float32 over rounded inputs.
    for name in ("dweight", "dbias", "running_mean", "running_var"):
        scale = max(1.0, want_q[name].abs().max().item())
        assert (got[name] - want_q[name]).abs().max().item() <= 4 * ulp * scale, name
    assert not any(torch.isnan(v).any() for v in got.values())
    del want


@device_param
@pytest.mark.parametrize("layer,groups", LAYERS, ids=LAYER_IDS)
def test_float64(device, layer, groups):
    """float64 inputs run the kernels in float64, exact to float64 rounding: no float32
    constant or scalar (momentum, eps, reduction weights) on the path."""
    _compare(Case(layer, (3, 6, 2, 3), device, groups), dtype=torch.float64, tol=1e-13)


@device_param
@pytest.mark.parametrize("layer,groups", [("stoch", None), ("bgn", 2), ("bgn", 8), ("cbn", None)],
                         ids=LAYER_IDS)
def test_large_offset_float32(device, layer, groups):
    """1e4 + randn in float32 against float64: centred statistics keep it accurate (the
    float32 input itself is only resolved to ~1e-3 there). E[x^2] - E[x]^2 would be off
    by orders of magnitude."""
    case = Case(layer, (4, 4, 5, 4), device, groups, offset=1e4)
    case.x = case.x.float().double()  # the reference sees the same float32 values
    with small_tiles(tile=16):
        got = case.run("triton", torch.float32)
    want = case.run("reference", torch.float64)
    # Errors here are ~1e-4 (PyTorch's own float32 BatchNorm: ~3e-4).
    _check(got, want, {"y": 1e-3, "dx": 1e-3, "dweight": 2e-3, "dbias": 1e-5, "running_mean": 1e-6,
                       "running_var": 5e-4, "mu_t": 1e-6, "var_t": 2e-3})


# ---------------------------------------------------------------------------------------
# Running statistics: momentum=None (cumulative) and the step count, in the op
# ---------------------------------------------------------------------------------------

def _call(impl, layer, x, rm, rv, mask, past, momentum, steps, training=True, update_stats=True):
    if layer == "stoch":
        return impl.stoch_norm(x, None, None, rm, rv, mask, training, momentum, 1e-5, update_stats, steps)
    if layer == "bgn":
        return impl.batch_group_norm(x, rm.shape[0], None, None, rm, rv, training, momentum, 1e-5,
                                     update_stats, steps)
    return impl.cross_iteration_norm(x, None, None, rm, rv, *past, training, momentum, 1e-5, update_stats,
                                     steps)[0]


@device_param
@pytest.mark.parametrize("layer,groups", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "momentum"])
def test_step_count_and_cumulative_momentum(device, layer, groups, momentum, T):
    """Three training steps from a random state: num_batches_tracked is incremented by the
    call, momentum=None takes 1/num_batches_tracked from the tensor (after the increment),
    exactly as reference.update_running_stats; update_stats=False and eval leave both alone."""
    case = Case(layer, (3, 6, 2, 3), device, groups)
    state = {}
    for backend, impl, dev in (("triton", T, device), ("reference", reference, "cpu")):
        rm, rv = case.running_mean.to(dev, torch.float32), case.running_var.to(dev, torch.float32)
        steps = torch.tensor(7, device=dev)
        mask = case.mask.to(dev)
        past = tuple(t.to(dev, torch.float32 if t.is_floating_point() else t.dtype)
                     for t in (case.past_mean, case.past_var, case.past_keep))
        for step in range(3):
            x = (case.x * (1 + step) + step).to(dev, torch.float32)
            _call(impl, layer, x, rm, rv, mask, past, momentum, steps)
        before = (rm.clone(), rv.clone(), steps.clone())
        _call(impl, layer, x, rm, rv, mask, past, momentum, steps, update_stats=False)
        _call(impl, layer, x, rm, rv, mask, past, momentum, steps, training=False)
        assert all(torch.equal(a, b) for a, b in zip((rm, rv, steps), before)), backend
        state[backend] = (rm.cpu().double(), rv.cpu().double(), steps.cpu())
    assert int(state["triton"][2]) == int(state["reference"][2]) == 10
    for got, want in zip(state["triton"][:2], state["reference"][:2]):
        assert not torch.isnan(got).any()
        assert (got - want).abs().max().item() <= FP32_TOL * max(1.0, want.abs().max().item())
    if momentum is None:  # the cumulative average differs visibly from a fixed momentum
        assert (state["reference"][0] - case.running_mean).abs().max() > 1e-3


@device_param
def test_cumulative_momentum_needs_the_step_count(device):
    """momentum=None without num_batches_tracked: the op refuses before it changes anything."""
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    before = rm.clone(), rv.clone()
    with pytest.raises(RuntimeError, match="momentum=None .* needs num_batches_tracked"):
        torch.ops.stochnorm_ext.triton_batch_group_norm_stats(
            torch.randn(3, 4, 5, device=device), 4, rm, rv, None, None, True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@device_param
@pytest.mark.parametrize("layer", ["stoch", "cbn"])
@pytest.mark.parametrize("x_dtype,param_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                 (torch.bfloat16, torch.float32)], ids=["f64-f32", "f32-f64", "bf16-f32"])
def test_eval_with_mixed_dtypes(device, layer, x_dtype, param_dtype, T):
    """Eval StochNorm / CBN is F.batch_norm, which refuses some mixes of input and parameter
    dtypes that the layers accept: those run in the accumulation dtype, like the reference."""
    case = Case(layer, (3, 6, 2, 3), device)
    x = case.x.to(device, x_dtype)
    prm = [t.to(device, param_dtype) for t in (case.weight, case.bias, case.running_mean, case.running_var)]
    if layer == "stoch":
        y = T.stoch_norm(x, *prm, case.mask.to(device), False, 0.1, 1e-5)
        want = reference.stoch_norm(x.cpu(), *[t.cpu() for t in prm], case.mask, False, 0.1, 1e-5)
    else:
        empty = torch.zeros(0, 6, device=device)
        y = T.cross_iteration_norm(x, *prm, empty, empty, empty.bool(), False, 0.1, 1e-5)[0]
        want = reference.cross_iteration_norm(x.cpu(), *[t.cpu() for t in prm], empty.cpu(), empty.cpu(),
                                              empty.cpu().bool(), False, 0.1, 1e-5)[0]
    assert y.dtype == x_dtype
    tol = FP32_TOL if x_dtype != torch.bfloat16 else torch.finfo(torch.bfloat16).eps
    _check({"y": y.detach().cpu().double()}, {"y": want.double()}, tol)
