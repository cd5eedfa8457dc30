"""PyTorch's own ``nn.BatchNorm*d`` module tests run against our layers in their BatchNorm
configurations: StochNorm ``p=1``, BGN ``G=C`` and CBN ``window=1`` (4-D inputs only; and
``Conv2dCBN`` against ``nn.Conv2d`` + ``nn.BatchNorm2d`` on its first step, when its window is
still empty).

The inputs are the ModuleInfo entries of ``torch.testing._internal.common_modules``
(``module_inputs_torch_nn_BatchNorm{1,2,3}d`` and ``module_error_inputs_torch_nn_BatchNorm1d_2d_3d``);
the checks follow ``test/test_modules.py`` (TestModule): forward and gradients against
``nn.BatchNorm*d`` (state after two steps included), non-contiguous input, memory format,
pickle, repr, factory kwargs, meta-device construction, error inputs. Every backend that runs
here (the Triton interpreter gets a few inputs: it is slow).

Documented differences: StochNorm needs running statistics (``track_running_stats=False``
cases are skipped for it); ``eps <= 0`` raises at construction, BatchNorm at its first
training forward (same ValueError and message).
"""
import io
import pickle

import pytest
import torch
from torch import nn

import stochnorm_ext as sx
from conftest import available

common_modules = pytest.importorskip("torch.testing._internal.common_modules",
                                     reason="PyTorch's module test inputs need expecttest")

BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INFOS = {info.module_cls: info for info in common_modules.module_db if info.module_cls in BN_CLASSES.values()}
BACKENDS = ["reference", "cpu", "triton", "cuda"]
# The Triton interpreter runs these inputs only (one per dim, and the bias/affine variants).
TRITON_INPUTS = {(1, "affine_not_bias"), (1, "3d_input"), (2, ""), (2, "not_affine"), (3, "momentum")}
POSITIONAL = ("eps", "momentum", "affine", "track_running_stats")


def _make(kind, dims, args, kwargs, backend):
    """Our layer in its BatchNorm configuration, from nn.BatchNorm*d's constructor arguments."""
    C, kw = args[0], dict(zip(POSITIONAL, args[1:]), **kwargs)
    if kind == "stochnorm":
        return {1: sx.StochNorm1d, 2: sx.StochNorm2d, 3: sx.StochNorm3d}[dims](C, p=1.0, backend=backend, **kw)
    if kind == "bgn":
        return {1: sx.BatchGroupNorm1d, 2: sx.BatchGroupNorm2d, 3: sx.BatchGroupNorm3d}[dims](
            C, C, backend=backend, **kw)
    return sx.CrossIterationBatchNorm2d(C, window=1, backend=backend, **kw)


def _cases():
    """(dims, desc, kind, backend) for every ModuleInfo input, layer kind and backend."""
    cases = []
    for dims, bn_cls in BN_CLASSES.items():
        for mi in INFOS[bn_cls].module_inputs_func(INFOS[bn_cls], device="cpu", dtype=torch.float64,
                                                   requires_grad=True, training=True):
            args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
            tracks = dict(zip(POSITIONAL, args[1:]), **kwargs).get("track_running_stats", True)
            for kind in ("stochnorm", "bgn", "cbn"):
                if (kind == "cbn" and dims != 2) or (kind == "stochnorm" and not tracks):
                    continue
                for backend in BACKENDS:
                    if backend == "triton" and (dims, mi.desc) not in TRITON_INPUTS:
                        continue
                    cases.append(pytest.param(dims, mi.desc, kind, backend,
                                              id=f"{bn_cls.__name__}-{mi.desc or 'default'}-{kind}-{backend}"))
    return cases


CASES = _cases()


def _device(backend):
    for device in ("cpu", "cuda"):
        if available(backend, device):
            return device
    pytest.skip(f"backend {backend!r} does not run here")


def _module_input(dims, desc, device, dtype, training):
    info = INFOS[BN_CLASSES[dims]]
    for mi in info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=training):
        if mi.desc == desc:
            return mi
    raise KeyError(desc)


def _pair(dims, desc, kind, backend, dtype=torch.float64, training=True):
    """(ours, nn.BatchNorm*d with the same random state, the ModuleInfo input)."""
    device = _device(backend)
    mi = _module_input(dims, desc, device, dtype, training)
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    bn = BN_CLASSES[dims](*args, **kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():  # random parameters and statistics (never the init values)
        floats = [(n, b) for n, b in bn.named_buffers() if b.is_floating_point()]
        for name, t in list(bn.named_parameters()) + floats:
            t.copy_(torch.rand_like(t) + 0.5 if name == "running_var" else torch.randn_like(t))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(3)
    ours = _make(kind, dims, args, kwargs, backend).to(device=device, dtype=dtype)
    ours.load_state_dict(bn.state_dict())
    return ours.train(training), bn.train(training), mi


def _bn_state(ours):
    """Our state dict without what BatchNorm lacks (CBN's own step counter and window)."""
    return {k: v for k, v in ours.state_dict().items() if k != "step" and not k.startswith("window_")}


def _same_state(ours, bn):
    theirs = bn.state_dict()
    mine = _bn_state(ours)
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], msg=key)


def _run(module, x, grad_out):
    """Output and gradients (input, then parameters) of one forward/backward."""
    x = x.detach().requires_grad_()
    params = [p for p in module.parameters()]
    y = module(x)
    grads = torch.autograd.grad(y, [x] + params, grad_out, allow_unused=True) if y.numel() else ()
    return y, grads


def _compare(ours, bn, x, steps=2):
    for _ in range(steps):  # two steps: momentum=None and num_batches_tracked count
        grad_out = torch.randn(x.shape, dtype=x.dtype, device=x.device)
        y, grads = _run(ours, x, grad_out)
        y_bn, grads_bn = _run(bn, x, grad_out)
        torch.testing.assert_close(y, y_bn)
        assert y.is_contiguous(memory_format=_format(y_bn)), "output memory format differs from BatchNorm's"
        for g, g_bn in zip(grads, grads_bn):
            torch.testing.assert_close(g, g_bn)
        _same_state(ours, bn)


def _format(t):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


# ------------------------------------------------------------------------------- forward, gradients
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dims,desc,kind,backend", CASES)
def test_forward_and_gradients(dims, desc, kind, backend, training):
    ours, bn, mi = _pair(dims, desc, kind, backend, training=training)
    _compare(ours, bn, mi.forward_input.args[0])


@pytest.mark.parametrize("dims,desc,kind,backend", CASES)
def test_non_contiguous_input(dims, desc, kind, backend):
    # TestModule's non-contiguous input: every other element of a tensor twice as long.
    ours, bn, mi = _pair(dims, desc, kind, backend)
    x = mi.forward_input.args[0].detach()
    strided = x.repeat_interleave(2, dim=-1)[..., ::2]
    assert (x.numel() == 0 or not strided.is_contiguous()) and torch.equal(strided, x)
    _compare(ours, bn, strided, steps=1)


@pytest.mark.parametrize("dims,desc,kind,backend", [c for c in CASES if c.values[0] in (2, 3)])
def test_channels_last_input(dims, desc, kind, backend):
    ours, bn, mi = _pair(dims, desc, kind, backend)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    _compare(ours, bn, mi.forward_input.args[0].detach().contiguous(memory_format=fmt), steps=1)


# ------------------------------------------------------------------------------- module properties
@pytest.mark.parametrize("dims,desc,kind,backend", [c for c in CASES if c.values[3] == "reference"])
def test_pickle_round_trip(dims, desc, kind, backend):
    ours, bn, mi = _pair(dims, desc, kind, backend)
    x = mi.forward_input.args[0].detach()
    ours(x)
    for copy in (pickle.loads(pickle.dumps(ours)), _torch_save_load(ours)):
        assert type(copy) is type(ours) and repr(copy) == repr(ours)
        for (k, a), (_, b) in zip(ours.state_dict().items(), copy.state_dict().items()):
            assert torch.equal(a, b), k
        torch.testing.assert_close(copy.eval()(x), ours.eval()(x), rtol=0, atol=0)
        ours.train()


def _torch_save_load(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("dims,desc,kind,backend", [c for c in CASES if c.values[3] == "reference"])
def test_repr_names_the_batchnorm_arguments(dims, desc, kind, backend):
    ours, bn, _ = _pair(dims, desc, kind, backend)
    text = repr(ours)
    assert text.startswith(type(ours).__name__ + f"({bn.num_features}, ")
    for key in POSITIONAL:
        assert f"{key}={getattr(bn, key)}" in text, (key, text)
    assert ("bias=False" in text) == (bn.affine and bn.bias is None)


@pytest.mark.parametrize("dims,desc,kind,backend", [c for c in CASES if c.values[3] == "reference"])
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.float16),
                                          ("meta", torch.float32)])
def test_factory_kwargs_and_meta_device(dims, desc, kind, backend, device, dtype):
    mi = _module_input(dims, desc, "cpu", torch.float32, True)
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    ours = _make(kind, dims, args, dict(kwargs, device=device, dtype=dtype), backend)
    bn = BN_CLASSES[dims](*args, **kwargs, device=device, dtype=dtype)
    shapes = lambda m: [(n, p.shape) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(ours) == shapes(bn)
    for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
        assert t.device.type == device, name
        assert t.dtype == (dtype if t.is_floating_point() else torch.long), name
    if device == "meta":  # materialise like a meta-initialised model
        ours.to_empty(device="cpu").reset_parameters()
        bn.to_empty(device="cpu").reset_parameters()
        _same_state(ours, bn)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kind", ["stochnorm", "bgn", "cbn"])
def test_error_inputs(dims, kind):
    if kind == "cbn" and dims != 2:
        pytest.skip("CBN is 2d only")
    info = INFOS[BN_CLASSES[dims]]
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                           training=True)
    assert errors
    for error in errors:
        mi = error.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        assert error.error_on in (common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR,
                                  common_modules.ModuleErrorEnum.FORWARD_ERROR)
        # Ours raises at construction, BatchNorm at its first training forward: the same error.
        with pytest.raises(error.error_type, match=error.error_regex):
            _make(kind, dims, args, kwargs, "reference")(*mi.forward_input.args, **mi.forward_input.kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            BN_CLASSES[dims](*args, **kwargs)(*mi.forward_input.args, **mi.forward_input.kwargs)


# ------------------------------------------------------------------------------- Conv2dCBN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("desc", [mi.desc for mi in INFOS[nn.BatchNorm2d].module_inputs_func(
    INFOS[nn.BatchNorm2d], device="cpu", dtype=torch.float64, requires_grad=True, training=True)
    if "bias" not in mi.constructor_input.kwargs])
def test_conv2dcbn_first_step_is_conv_and_batchnorm(desc, backend):
    # A CBN with a window > 1 and an empty window is BatchNorm; its conv runs through the
    # explicit-input route of Conv2dCBN (no hook). The ModuleInfo input feeds the conv.
    if backend == "triton" and (2, desc) not in TRITON_INPUTS:
        pytest.skip("the Triton interpreter runs a few inputs only")
    device = _device(backend)
    mi = _module_input(2, desc, device, torch.float64, True)
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    C = args[0]
    block = sx.Conv2dCBN(C, C, 3, padding=1, window=3, backend=backend, device=device, dtype=torch.float64,
                         **dict(zip(POSITIONAL, args[1:]), **kwargs))
    conv = nn.Conv2d(C, C, 3, padding=1, bias=False, device=device, dtype=torch.float64)
    reference = nn.Sequential(conv, nn.BatchNorm2d(*args, **kwargs, device=device, dtype=torch.float64))
    with torch.no_grad():
        block.conv.weight.normal_()
        for t in block.norm.parameters():
            t.normal_()
        conv.weight.copy_(block.conv.weight)
        reference[1].load_state_dict(_bn_state(block.norm))
    x = mi.forward_input.args[0].detach()
    grad_out = torch.randn_like(x)  # the 3x3 conv with padding 1 keeps the shape
    y, grads = _run(block, x, grad_out)
    y_ref, grads_ref = _run(reference, x, grad_out)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    _same_state(block.norm, reference[1])
