"""The Triton backend against the reference (stochnorm_ext.reference) for every layer.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (conftest sets
TRITON_INTERPRET=1 and STOCHNORM_EXT_POISON_OUTPUTS=1, so every output the backend
allocates starts as NaN); with a GPU the same tests also run on CUDA tensors. The
interpreter's cost grows with programs x ops: shapes are small, and a few tests shrink
the tiles (``small_tiles``) so that several channel blocks, tiles per program and split
reductions are exercised on those small shapes.

The reference runs in float64 on the same inputs; float32 is compared tightly, float16 /
bfloat16 against a budget set by PyTorch's own low-precision BatchNorm error.
"""
import contextlib
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import stochnorm_ext as sx
from stochnorm_ext import reference
from stochnorm_ext.cbn_window import CBNWindow

from conftest import DEVICES, available

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    from stochnorm_ext.backends import triton
    return triton


@contextlib.contextmanager
def small_tiles(**overrides):
    """Tiny tiles and many programs: several channel blocks, several tiles per program,
    ragged last tiles and split reductions on small shapes."""
    from stochnorm_ext.backends import triton as T
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
        impl = reference if backend == "reference" else importlib.import_module("stochnorm_ext.backends.triton")
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


def test_float_scalars_are_float64_kernel_arguments(T):
    """A Python float reaches a compiled kernel as a float32 scalar unless the parameter is
    annotated: every float scalar of every kernel is tl.float64 (the interpreter keeps
    Python floats as they are, so test_float64 cannot see this on a CPU)."""
    import inspect
    import triton.language as tl
    float_params = {"momentum", "unbias", "inv_count", "eps"}
    seen = set()
    for name in dir(T._kernels):
        kernel = getattr(T._kernels, name)
        fn = getattr(kernel, "fn", None)
        if not name.endswith("_kernel") or fn is None:
            continue
        for param in inspect.signature(fn).parameters.values():
            if param.name in float_params:
                seen.add(param.name)
                assert param.annotation is tl.float64, f"{name}({param.name}): {param.annotation!r}"
    assert seen == float_params


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
# Through the public API: modules over several steps, CBN window state
# ---------------------------------------------------------------------------------------

def _module_steps(make, device, steps, shape, conv=None, seed=0):
    """Train ``steps`` steps then one eval step with a module on the triton and on the
    reference backend; returns both modules and the outputs/gradients of every step."""
    torch.manual_seed(seed)
    results = []
    for backend in ("triton", "reference"):
        torch.manual_seed(seed)
        mod = make(backend)
        mod_conv = conv() if conv is not None else None
        if mod_conv is not None:
            mod.bind(mod_conv)
            mod_conv.to(device)
        mod.to(device)
        outs = []
        g = torch.Generator().manual_seed(seed + 1)
        for step in range(steps + 1):
            mod.train(step < steps)
            x = torch.randn(shape, generator=g).to(device).requires_grad_()
            inp = mod_conv(x) if mod_conv is not None else x
            y = mod(inp)
            y.backward(torch.randn(y.shape, generator=g).to(device))
            outs.append((y.detach().cpu(), x.grad.cpu()))
            if mod_conv is not None and step < steps:
                with torch.no_grad():  # move the conv weight so compensation matters
                    mod_conv.weight.add_(torch.randn(mod_conv.weight.shape, generator=g).to(device), alpha=0.05)
                    mod_conv.weight.grad = None
        results.append((mod, outs))
    return results


def _compare_modules(results, tol=5e-5):
    (mod_t, outs_t), (mod_r, outs_r) = results
    for step, ((y_t, dx_t), (y_r, dx_r)) in enumerate(zip(outs_t, outs_r)):
        assert not torch.isnan(y_t).any() and not torch.isnan(dx_t).any()
        assert (y_t - y_r).abs().max().item() < tol, f"step {step}: y"
        assert (dx_t - dx_r).abs().max().item() < tol, f"step {step}: dx"
    state_t, state_r = mod_t.state_dict(), mod_r.state_dict()
    assert state_t.keys() == state_r.keys()
    for key in state_t:
        a, b = state_t[key].cpu(), state_r[key].cpu()
        if a.is_floating_point():
            assert (a.double() - b.double()).abs().max().item() < tol, key
        else:
            assert torch.equal(a, b), key
    for (name, p_t), (_, p_r) in zip(mod_t.named_parameters(), mod_r.named_parameters()):
        assert (p_t.grad.cpu() - p_r.grad.cpu()).abs().max().item() < tol * 10, f"grad {name}"


@device_param
def test_stoch_norm_module_steps(device):
    _compare_modules(_module_steps(lambda b: sx.StochNorm2d(5, p=0.5, backend=b), device, 3, (4, 5, 3, 3)))


@device_param
def test_batch_group_norm_module_steps(device):
    _compare_modules(_module_steps(lambda b: sx.BatchGroupNorm2d(4, num_groups=8, momentum=None, backend=b),
                                   device, 3, (3, 4, 2, 3)))


@device_param
def test_cbn_window_state_after_steps(device):
    """CBN through the public module with a bound conv: outputs, gradients, running
    statistics and every window buffer (means, variances, Jacobians, head, step) after
    the burn-in and enough steps to wrap the ring buffer."""
    results = _module_steps(
        lambda b: sx.CrossIterationBatchNorm2d(4, window=3, burnin=1, backend=b), device, 5,
        (3, 2, 5, 5), conv=lambda: torch.nn.Conv2d(2, 4, 3, padding=1, bias=False))
    _compare_modules(results, tol=1e-4)
    mod_t = results[0][0]
    assert int(mod_t.state_dict()[[k for k in mod_t.state_dict() if k.endswith("step")][0]]) == 5


@device_param
def test_cbn_functional_window(device):
    """The functional form with an explicit window and conv arguments."""
    outs = []
    for backend in ("triton", "reference"):
        torch.manual_seed(3)
        conv_w = torch.randn(4, 2, 3, 3, device=device) * 0.3
        window = CBNWindow.empty(3, 4, conv_w.shape, device=device)
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        ys = []
        for step in range(4):
            inp = torch.randn(2, 2, 5, 5, device=device)
            x = F.conv2d(inp, conv_w, padding=1)
            ys.append(sx.functional.cross_iteration_batch_norm(
                x, inp, conv_w, window, None, None, rm, rv, training=True, padding=1, backend=backend).cpu())
            conv_w = conv_w + 0.05 * torch.randn_like(conv_w)
        outs.append((ys, window, rm, rv))
    (ys_t, win_t, rm_t, rv_t), (ys_r, win_r, rm_r, rv_r) = outs
    for a, b in zip(ys_t, ys_r):
        assert (a - b).abs().max().item() < 5e-5
    for a, b in zip(win_t, win_r):
        assert (a.double() - b.double()).abs().max().item() < 1e-4 if a.is_floating_point() else torch.equal(a, b)
    assert (rm_t - rm_r).abs().max().item() < 1e-5 and (rv_t - rv_r).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------
# Ops: poisoning, opcheck, double backward, torch.compile
# ---------------------------------------------------------------------------------------

@device_param
def test_outputs_are_poisoned_before_the_kernels_run(device, T, monkeypatch):
    monkeypatch.setenv(T.POISON_ENV, "1")
    assert torch.isnan(T._new(5, torch.float32, device)).all()
    monkeypatch.setenv(T.POISON_ENV, "0")
    T._new(5, torch.float32, device)  # no fill: nothing to check but that it runs


def _op_samples(device):
    x = torch.randn(4, 6, 3, 2, device=device)
    w, b = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    stats = (torch.randn(6, device=device), torch.rand(6, device=device) + 0.5, torch.rand(6, device=device))
    ops = torch.ops.stochnorm_ext
    return [
        (ops.triton_norm_apply.default,
         (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), *stats, 6, 1e-5)),
        (ops.triton_norm_apply.default,
         (x.clone().requires_grad_(), None, None, torch.randn(12, device=device),
          torch.rand(12, device=device) + 0.5, None, 12, 1e-5)),
        (ops.triton_stoch_norm_stats.default,
         (x, torch.zeros(6, device=device), torch.ones(6, device=device), torch.rand(6, device=device) < 0.5, 0.1, True)),
        (ops.triton_batch_group_stats.default,
         (x.to(memory_format=torch.channels_last), 3, torch.zeros(3, device=device), torch.ones(3, device=device), 0.1, True)),
        (ops.triton_cross_iteration_stats.default,
         (x, torch.zeros(6, device=device), torch.ones(6, device=device), torch.randn(2, 6, device=device),
          torch.rand(2, 6, device=device), torch.rand(2, 6, device=device) < 0.5, 0.1, True)),
        (ops.triton_norm_bwd.default,
         (torch.randn_like(x), x, w, *stats, 6, 1e-5, True)),
    ]


@device_param
@pytest.mark.parametrize("index", range(6), ids=["apply", "apply-pieces", "stoch-stats", "bgn-stats",
                                                 "cbn-stats", "bwd"])
def test_opcheck(device, index, T):
    """Schema, fake implementation, autograd registration and AOT dispatch of every op."""
    op, args = _op_samples(device)[index]
    torch.library.opcheck(op, args)


@device_param
def test_double_backward_raises(device):
    x = torch.randn(4, 3, 5, device=device, requires_grad=True)
    w = torch.ones(3, device=device, requires_grad=True)
    y = sx.functional.batch_group_norm(x, 3, weight=w, training=True, backend="triton")
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


@device_param
def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) of a training step: same output, gradients and
    running statistics as eager. On CUDA the ops are triton_ops and inductor sees the
    kernels; under the interpreter they are opaque custom ops (wrap_triton cannot trace
    interpreted kernels), compiled here with the aot_eager backend to keep it quick."""
    sx.backends()  # load the backend outside the compiled region (resolve() imports lazily)

    def step(x, w, b, rm, rv, mask):
        y = sx.functional.batch_group_norm(x, 3, rm[:3], rv[:3], w, b, training=True, backend="triton")
        return sx.functional.stoch_norm(y, rm, rv, w, b, training=True, mask=mask, backend="triton")

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for fn in (compiled, step):
        torch.manual_seed(0)
        x = torch.randn(4, 6, 3, 3, device=device, requires_grad=True)
        w = torch.rand(6, device=device, requires_grad=True)
        b = torch.randn(6, device=device, requires_grad=True)
        rm, rv = torch.zeros(6, device=device), torch.ones(6, device=device)
        y = fn(x, w, b, rm, rv, torch.arange(6, device=device) % 2 == 0)
        y.backward(torch.ones_like(y))
        results.append([t.detach().cpu() for t in (y, x.grad, w.grad, b.grad, rm, rv)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Host-side logic, packaging, compilation for a real GPU
# ---------------------------------------------------------------------------------------

def test_plan_fills_the_gpu_with_few_channels(T):
    """64 channels at batch 2 must not run on 64 programs: the reduction is split."""
    saved = dict(T.TUNING)
    T.TUNING.update(tile=1024, max_block_c=128, programs=8 * 132)
    try:
        for fmt in (torch.contiguous_format, torch.channels_last):
            plan = T.plan_for_shape((2, 64, 56, 56), fmt, 1, torch.device("cuda"))
            programs = plan.grid[0] * plan.grid[1]
            tiles = plan.grid[0] * plan.n * math.ceil(plan.piece_len / plan.block_i)
            assert programs >= min(4 * 132, tiles) and programs > 64, (fmt, plan.grid)
            covered = plan.splits * plan.tiles_per_split * plan.block_i
            assert covered >= plan.n * plan.piece_len
        # NCHW 56x56 rows are cut without a ragged, mostly empty last block
        plan = T.plan_for_shape((32, 256, 56, 56), torch.contiguous_format, 1, torch.device("cuda"))
        assert 3136 % plan.block_i < plan.block_i and math.ceil(3136 / plan.block_i) * plan.block_i <= 3136 * 1.07
        # more than 2**31 elements: the plan works in Python ints (the kernels in int64)
        plan = T.plan_for_shape((256, 64, 512, 512), torch.channels_last, 2, torch.device("cuda"))
        assert plan.grid[1] <= 65535 and plan.n * plan.s * plan.C > 2 ** 31
    finally:
        T.TUNING.clear()
        T.TUNING.update(saved)


def test_package_imports_without_triton():
    """stochnorm_ext (and its triton_kernels package) import without triton; the backend
    then reports why it is unavailable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib.util, os\n"
        "import stochnorm_ext as sx\n"
        "reason = sx.backends()['triton']\n"
        "assert reason and 'triton' in reason, reason\n"
        "from stochnorm_ext import _backend_triton as T\n"
        "assert T.UNAVAILABLE\n"
        f"spec = importlib.util.spec_from_file_location('tk', os.path.join({ROOT!r}, 'stochnorm_ext', 'triton_kernels', '__init__.py'))\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_backend_runs_its_own_packages_kernels(T):
    """The backend launches the kernels of its own package (they live inside it), even where
    an editable install of another checkout is on the path."""
    assert os.path.dirname(os.path.abspath(T._kernels.__file__)) == \
        os.path.join(os.path.dirname(os.path.abspath(T.__file__)), "triton_kernels")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not available("triton", "cpu") and not torch.cuda.is_available(),
                    reason="triton is not available")
def test_kernels_compile_for_sm90():
    """Every kernel specialisation the backend launches compiles (to a cubin, through
    ptxas) for sm_90 with this Triton, no GPU needed: the interpreter does not type-check
    like the compiler (this caught a loop-carried type change). Slow: minutes on 2 cores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "stochnorm_ext.triton_kernels.compile_check", "--quick"],
                         env=env, capture_output=True, text=True, timeout=880, cwd=ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and ~20 GB of GPU memory)")
@pytest.mark.timeout(600)
def test_over_2_to_the_31_elements_cuda():
    """64-bit offsets: a bfloat16 input of more than 2**31 elements; the last channels
    are checked against PyTorch on a slice."""
    if torch.cuda.get_device_properties(0).total_memory < 30 * 2 ** 30:
        pytest.skip("not enough GPU memory")
    x = torch.randn(2 ** 31 // (16 * 4096) + 1, 16, 64, 64, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2 ** 31
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    y = sx.functional.stoch_norm(x, rm, rv, training=True, mask=torch.ones(16, dtype=torch.bool, device="cuda"),
                                 backend="triton")
    tail = x[:, -2:].float()
    var, mean = torch.var_mean(tail, dim=(0, 2, 3), correction=0)
    want = (tail - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1)
    assert (y[:, -2:].float() - want).abs().max().item() < 0.05
