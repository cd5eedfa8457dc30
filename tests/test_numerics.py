"""Numerics every backend must hold, for every layer and grouping, against the reference
and nn.BatchNorm2d (issue 15, items 4-6):

- float32 statistics at a large common offset (``randn + 1e4`` / ``+ 1e6``): the running
  variance within a few times the reference's own error (which is about one float32
  rounding), whatever the grouping (BGN groups of several channels merge per-channel
  statistics: their means must not be rounded to float32 before the merge);
- huge inputs (1e20-1e30 in float32) whose variance overflows: outputs finite where
  nn.BatchNorm2d's are, running variance inf where BatchNorm's is, later eval finite;
- float64: outputs and gradients exact to float64 rounding (no float32 constant, scalar or
  cast on the float64 path).

Shapes are small: the Triton kernels run under the interpreter here.
"""
import math

import pytest
import torch

import stochnorm_ext as sx

from conftest import available

pytestmark = pytest.mark.timeout(300)

C = 6
SHAPE = (8, C, 7, 6)  # 42 positions: G = 2C cuts each channel into 2 pieces of 21
F32_EPS = torch.finfo(torch.float32).eps

# (backend, device): CPU ones run here, CUDA ones skip without a GPU.
BACKENDS = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]


def _backend_params():
    params = []
    for backend, device in BACKENDS:
        ok = available(backend, device) if device == "cpu" or torch.cuda.is_available() else False
        mark = () if ok else pytest.mark.skip(reason=f"backend {backend} does not run on {device} here")
        params.append(pytest.param(backend, device, marks=mark, id=f"{backend}-{device}"))
    return params


backend_param = pytest.mark.parametrize("backend,device", _backend_params())

# (kind, groups): StochNorm, BGN with 2 channels per group, all channels in one group, G = C
# (BatchNorm), G = 2C (pieces of channels), CBN.
LAYERS = [("stoch", None), ("bgn", 3), ("bgn", 1), ("bgn", C), ("bgn", 2 * C), ("cbn", None)]
LAYER_IDS = ["stoch", "bgn-2-channels-per-group", "bgn-1-group", "bgn-G=C", "bgn-G=2C", "cbn"]
layer_param = pytest.mark.parametrize("kind,groups", LAYERS, ids=LAYER_IDS)


def make_layer(kind, groups, backend, momentum=1.0):
    """The layer with every channel on batch statistics (StochNorm p = 1) and, by default,
    momentum 1 so that the running statistics are this batch's."""
    if kind == "stoch":
        return sx.StochNorm2d(C, p=1.0, momentum=momentum, backend=backend)
    if kind == "bgn":
        return sx.BatchGroupNorm2d(C, num_groups=groups, momentum=momentum, backend=backend)
    return sx.CrossIterationBatchNorm2d(C, window=1, momentum=momentum, backend=backend)


def statistic_values(x64, kind, groups):
    """(num_stats, values) view of float64 data as the layer groups it."""
    G = groups if kind == "bgn" else C
    return x64.reshape(x64.shape[0], G, -1).transpose(0, 1).reshape(G, -1)


def train_step(kind, groups, backend, device, x):
    layer = make_layer(kind, groups, backend).to(device).train()
    with torch.no_grad():
        y = layer(x.to(device))
    return layer, y.cpu()


# ---------------------------------------------------------------------------------------
# Large common offset, float32
# ---------------------------------------------------------------------------------------

def _offset_errors(kind, groups, backend, device, x):
    """Relative errors of the running variance and of the outputs' per-statistic variance,
    and the absolute errors of running mean and outputs, against float64 on the same
    float32 values."""
    layer, y = train_step(kind, groups, backend, device, x)
    vals = statistic_values(x.double(), kind, groups)
    var64, mean64 = torch.var_mean(vals, dim=1, correction=0)
    n = vals.shape[1]
    rv, rm = layer.running_var.cpu().double(), layer.running_mean.cpu().double()
    y_stats = statistic_values(y.double(), kind, groups)
    y_true = (vals - mean64[:, None]) / torch.sqrt(var64[:, None] + layer.eps)
    return dict(
        running_var=((rv - var64 * n / (n - 1)).abs() / (var64 * n / (n - 1))).max().item(),
        running_mean=(rm - mean64).abs().max().item(),
        y_var=((y_stats.var(dim=1, correction=0) - var64 / (var64 + layer.eps)).abs()).max().item(),
        y=(y_stats - y_true).abs().max().item(),
    )


@backend_param
@layer_param
@pytest.mark.parametrize("offset", [1e4, 1e6], ids=["1e4", "1e6"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_offset_float32_statistics(backend, device, kind, groups, offset, layout):
    """``randn + offset`` in float32, momentum 1: the running variance within max(4 x the
    reference's error, 4 float32 epsilons) and the outputs' variance per statistic within
    max(4 x the reference's, 8 epsilons: it also carries invstd's and y's roundings); the
    running mean and the outputs within 4 x the reference's error or the rounding of a
    float32 mean at the offset (one ulp there: the centre itself is a float32)."""
    torch.manual_seed(0)
    x = (torch.randn(SHAPE, dtype=torch.float64) + offset).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    got = _offset_errors(kind, groups, backend, device, x)
    ref = _offset_errors(kind, groups, "reference", "cpu", x)
    ulp = (torch.tensor(offset, dtype=torch.float32).nextafter(torch.tensor(math.inf)) - offset).item()
    # y: the float32 centre's rounding (one ulp, times invstd ~ 1) plus a few roundings of |y| < 5
    floors = dict(running_var=4 * F32_EPS, y_var=8 * F32_EPS, running_mean=ulp, y=ulp + 8 * F32_EPS * 5)
    for key, floor in floors.items():
        bound = max(4 * ref[key], floor)
        assert got[key] <= bound, (f"{backend} {kind} G={groups} offset {offset:g}: {key} error {got[key]:.3g} > "
                                   f"{bound:.3g} (reference {ref[key]:.3g})")


# ---------------------------------------------------------------------------------------
# Huge inputs: variance overflows float32
# ---------------------------------------------------------------------------------------

@backend_param
@layer_param
@pytest.mark.parametrize("scale", [1e20, 1e25, 1e30], ids=["1e20", "1e25", "1e30"])
def test_huge_inputs_like_batchnorm(backend, device, kind, groups, scale):
    """nn.BatchNorm2d on ``randn * scale``: finite outputs and gradients, running variance
    inf, finite eval outputs after. Every layer does the same; in BatchNorm's configuration
    (StochNorm p = 1, BGN G = C, CBN window 1) the outputs equal BatchNorm's."""
    torch.manual_seed(0)
    x = torch.randn(SHAPE) * scale
    dy = torch.randn(SHAPE)
    bn = torch.nn.BatchNorm2d(C).train()
    xb = x.clone().requires_grad_()
    y_bn = bn(xb)
    y_bn.backward(dy)
    assert y_bn.isfinite().all() and xb.grad.isfinite().all() and bn.running_var.isinf().all()

    layer = make_layer(kind, groups, backend, momentum=0.1).to(device).train()
    xl = x.to(device, copy=True).requires_grad_()
    y = layer(xl)
    y.backward(dy.to(device))
    assert y.isfinite().all(), f"{backend} {kind}: non-finite outputs"
    assert xl.grad.isfinite().all(), f"{backend} {kind}: non-finite input gradient"
    assert layer.weight.grad.isfinite().all() and layer.bias.grad.isfinite().all()
    assert layer.running_var.isinf().all(), f"{backend} {kind}: running_var {layer.running_var.tolist()}"
    assert layer.running_mean.isfinite().all()
    if kind != "bgn" or groups == C:
        torch.testing.assert_close(y.detach().cpu(), y_bn.detach())
    layer.eval()
    with torch.no_grad():
        assert layer(x.to(device)).isfinite().all(), f"{backend} {kind}: non-finite eval outputs"


# ---------------------------------------------------------------------------------------
# float64: exact to float64 rounding
# ---------------------------------------------------------------------------------------

@backend_param
@layer_param
def test_float64_outputs_and_gradients(backend, device, kind, groups):
    """float64 outputs, input/parameter gradients and running statistics against the
    reference to 1e-13 (relative to each tensor's magnitude). StochNorm uses p = 0.5 here,
    so both branches are checked; momentum 0.1 checks the running update's arithmetic."""
    torch.manual_seed(0)
    x = torch.randn((4, C, 3, 4), dtype=torch.float64) * 1.5 + 0.5
    dy = torch.randn_like(x)
    results = []
    # The reference runs on the backend's device: the StochNorm mask is drawn there, from
    # that device's generator (CPU and CUDA draw different masks for one seed).
    for b, dev in ((backend, device), ("reference", device)):
        torch.manual_seed(1)
        layer = make_layer(kind, groups, b, momentum=0.1).double()
        if kind == "stoch":
            layer.p = 0.5
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 1.5)
        layer.to(dev).train()
        xl = x.to(dev, copy=True).requires_grad_()  # its own .grad on each backend
        torch.manual_seed(2)  # the same StochNorm mask on both backends
        y = layer(xl)
        y.backward(dy.to(dev))
        results.append(dict(y=y, dx=xl.grad, dweight=layer.weight.grad, dbias=layer.bias.grad,
                            running_mean=layer.running_mean, running_var=layer.running_var))
    got, want = results
    for key in want:
        g, w = got[key].detach().cpu(), want[key].detach().cpu()
        err = (g - w).abs().max().item()
        assert err <= 1e-13 * max(1.0, w.abs().max().item()), f"{backend} {kind}: {key} error {err:.3g}"
