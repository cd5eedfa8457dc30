"""The layers with the rest of PyTorch: autocast, memory formats, torch.compile, torch.export,
activation checkpointing of converted torchvision blocks, deterministic algorithms.

Every check runs on each backend available here for CPU tensors (reference, the C++ cpu
backend when built and enabled, triton under its interpreter); CUDA variants skip without
a GPU. Tests marked ``slow`` compile whole converted ResNet-18s (tens of seconds each on
2 cores); ``-m "not slow"`` leaves them out.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import stochnorm_ext as sx
from conftest import available

torchvision = pytest.importorskip("torchvision")

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if available(b, "cpu")]
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- helpers
def _randomize(module):
    """Non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for name, t in module.named_parameters():
            if name.endswith("weight") and t.dim() == 1:
                t.uniform_(0.5, 1.5)
            elif name.endswith("bias") and t.dim() == 1:
                t.normal_(0, 0.3)
        for name, t in module.named_buffers():
            if name.endswith("running_mean"):
                t.normal_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)


def _layer(name, C, backend, conv):
    """The layer ``name`` for the C output channels of ``conv`` (2d or 3d)."""
    if name == "stochnorm":
        return (sx.StochNorm2d if conv.weight.dim() == 4 else sx.StochNorm3d)(C, p=0.5, backend=backend)
    if name == "bgn_groups":
        return (sx.BatchGroupNorm2d if conv.weight.dim() == 4 else sx.BatchGroupNorm3d)(C, 2, backend=backend)
    if name == "bgn_pieces":
        return (sx.BatchGroupNorm2d if conv.weight.dim() == 4 else sx.BatchGroupNorm3d)(C, 2 * C, backend=backend)
    return sx.CrossIterationBatchNorm2d(C, window=2, burnin=0, backend=backend).bind(conv)


LAYER_NAMES = ["stochnorm", "bgn_groups", "bgn_pieces", "cbn"]


def _conv_norm_relu(name, backend, dims=2):
    torch.manual_seed(0)
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(3, 4, 3, padding=1, bias=False)  # as in ResNets
    norm = _layer(name, 4, backend, conv)
    _randomize(norm)
    return nn.Sequential(conv, norm, nn.ReLU())


def _run_steps(model, inputs, autocast=None, seed=0):
    """Training steps (SGD); returns per step (output, input grad, param grads) and the state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    record = []
    for step, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        torch.manual_seed(seed + step)  # the same StochNorm masks in every run
        if autocast is None:
            y = model(x)
        else:
            with torch.autocast(**autocast):
                y = model(x)
        (y.float() * torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape)).sum().backward()
        record.append((y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]))
        opt.step()
        opt.zero_grad()
    return record, {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- autocast
def test_batchnorm_autocast_policy_on_cpu():
    """What we match: under CPU autocast nn.BatchNorm2d takes the conv's bfloat16 output,
    returns bfloat16 and keeps float32 parameters and buffers (batch_norm is in no autocast
    list, so it runs in its input's dtype)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 5, 5)).dtype == torch.bfloat16
    assert all(t.dtype in (torch.float32, torch.long) for t in model.state_dict().values())


def _assert_relative_error(actual, expected, tol, what=""):
    """||actual - expected|| <= tol * ||expected|| (a whole-tensor criterion)."""
    error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"


def _check_autocast(name, backend, device, dtype):
    model = _conv_norm_relu(name, backend).to(device)
    # Two float32 steps first: CBN's window holds an entry, the running statistics moved.
    _run_steps(model, [torch.randn(8, 3, 6, 6, device=device) for _ in range(2)])
    reference = copy.deepcopy(model)
    seen = []
    model[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(8, 3, 6, 6, device=device)
    # One step from the same state in each precision (no compounding over steps).
    ([(y, gx, grads)], state_mixed) = _run_steps(model, [x], autocast=dict(device_type=device, dtype=dtype))
    ([(y32, gx32, grads32)], state_full) = _run_steps(reference, [x])
    assert seen == [dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y32, rtol=0.02, atol=0.02)
    # Gradients: bfloat16 rounding of the conv output and a few flipped ReLU signs make
    # them noisier (nn.BatchNorm2d shows the same), so compare them as a whole.
    _assert_relative_error(gx.float(), gx32, 0.1)
    for g, g32 in zip(grads, grads32):
        assert g.dtype == torch.float32
        _assert_relative_error(g, g32, 0.1)
    params = dict(model.named_parameters())
    for key, value in state_mixed.items():
        assert value.dtype == state_full[key].dtype, key  # parameters and buffers stay float32
        if key in params:  # updated with the gradients compared above
            continue
        if value.is_floating_point():  # running statistics, CBN's window
            _assert_relative_error(value.double(), state_full[key].double(), 0.01)
        else:
            assert torch.equal(value, state_full[key]), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_cpu_autocast_bfloat16(name, backend):
    """Conv -> layer -> ReLU under torch.autocast('cpu', bfloat16) with float32 parameters:
    the layer gets bfloat16, returns bfloat16 (like nn.BatchNorm2d), parameters, gradients
    and buffers stay float32, and one step is close to the float32 step from the same state
    (after two float32 steps, so CBN's window and StochNorm's running statistics are used)."""
    _check_autocast(name, backend, "cpu", torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_cuda_autocast(name, backend, dtype):
    """The same under torch.autocast('cuda') in float16 and bfloat16 (needs a GPU)."""
    if not available(backend, "cuda"):
        pytest.skip(f"backend {backend} not available on CUDA")
    _check_autocast(name, backend, "cuda", dtype)


# --------------------------------------------------------------------------- memory formats
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_channels_last_in_channels_last_out(name, dims, backend):
    """channels_last (2d) / channels_last_3d input gives the same format out, with the
    values and gradients of the contiguous run."""
    if name == "cbn" and dims == 3:
        pytest.skip("CBN is 2d only")
    fmt = CL[dims + 2]
    shape = (3, 3, 4, 4) if dims == 2 else (3, 3, 2, 2, 4)
    inputs = [torch.randn(shape) for _ in range(2)]
    runs = []
    for memory_format in (torch.contiguous_format, fmt):
        model = _conv_norm_relu(name, backend, dims).to(memory_format=memory_format)
        formats = []
        model[1].register_forward_hook(lambda m, args, out: formats.append(
            (args[0].is_contiguous(memory_format=fmt), out.is_contiguous(memory_format=fmt))))
        runs.append((_run_steps(model, [x.contiguous(memory_format=memory_format) for x in inputs]), formats))
    ((plain, state_plain), formats_plain), ((steps, state), formats) = runs
    assert formats == [(True, True)] * len(inputs), formats  # channels_last in and out of the layer
    assert formats_plain == [(False, False)] * len(inputs), formats_plain
    for (y, gx, grads), (y0, gx0, grads0) in zip(steps, plain):
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx0, rtol=1e-4, atol=1e-5)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)
    for key in state:
        torch.testing.assert_close(state[key], state_plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_model_to_channels_last_with_cbn():
    """The usual way to run a ResNet channels_last works on a CBN-converted one:
    model.to(memory_format=...) converts every 4D/5D tensor, and CBN's window keeps its
    Jacobians in 3D buffers that the conversion leaves alone."""
    model = sx.convert_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "cbn", window=2)
    model.to(memory_format=torch.channels_last)
    for _ in range(2):  # the second step uses the stored entry
        y = model(torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


# --------------------------------------------------------------------------- torch.compile
# BGN with both groupings: 2 pieces per channel for the 64/128-channel layers (spatial
# sizes 16x16 and 8x8 here), groups of 32 channels for the 256/512-channel ones.
MIXED_GROUPS = lambda C: 2 * C if C <= 128 else C // 32  # noqa: E731
# 4 x 64 x 64: layer4 still sees 16 values per channel; with fewer (2 x 32 x 32 gives 2)
# BatchNorm's own gradients are so ill-conditioned that eager and compiled runs of a plain
# BatchNorm ResNet-18 part ways after one step.
IMAGE = (4, 3, 64, 64)
RESNET_KINDS = {
    "stochnorm": ("stochnorm", dict(p=0.5)),
    "bgn": ("bgn", dict(num_groups=MIXED_GROUPS)),  # both groupings in one model
    "cbn": ("cbn", dict(window=3, burnin=1)),
}


def _resnet(key, backend=None):
    """A converted ResNet-18 whose BatchNorms had running statistics of real activations
    (like a pretrained model): StochNorm's moving branch and eval then normalise."""
    kind, options = RESNET_KINDS[key]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0  # running statistics := this batch's
        model(torch.randn(8, *IMAGE[1:]))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return sx.convert_model(model, kind, backend=backend, **options)


def _loss(model, x, target):
    return nn.functional.cross_entropy(model(x), target)


def _train(model, loss_fn, steps=2, image=IMAGE):
    """``steps`` SGD steps on batches of shape ``image``; returns losses, gradients, state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for step in range(steps):
        x = torch.randn(image, generator=g)
        target = torch.randint(0, 10, image[:1], generator=g)
        torch.manual_seed(step)
        loss = loss_fn(model, x, target)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_training(a, b, tol):
    """Same losses, and gradients and state within ``tol`` (relative error of each tensor)."""
    (losses_a, grads_a, state_a), (losses_b, grads_b, state_b) = a, b
    torch.testing.assert_close(torch.stack(losses_a), torch.stack(losses_b), rtol=tol, atol=tol)
    for ga, gb in zip(grads_a, grads_b):
        for name in ga:
            _assert_relative_error(gb[name], ga[name], tol, name)
    for key in state_a:
        if state_a[key].is_floating_point():
            _assert_relative_error(state_b[key], state_a[key], tol, key)
        else:
            assert torch.equal(state_a[key], state_b[key]), key


def _compile_matches_eager(key, backend="aot_eager", tol=1e-5):
    torch._dynamo.reset()
    eager = _resnet(key)
    compiled_model = copy.deepcopy(eager)
    compiled_loss = torch.compile(_loss, fullgraph=True, backend=backend)
    _assert_same_training(_train(eager, _loss), _train(compiled_model, compiled_loss), tol)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("key", ["stochnorm", "bgn"])
def test_compile_converted_resnet18_matches_eager(key):
    """torch.compile(fullgraph=True, backend='aot_eager') of a converted ResNet-18's training
    forward (backward through AOTAutograd): 2 SGD steps give eager's losses, gradients,
    running statistics (and CBN windows), with the same StochNorm masks: the mask is drawn
    in the graph with the global generator."""
    _compile_matches_eager(key)


def _small_net(backend):
    """Every layer once, each after a conv, on 8 channels."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False) for i in range(4)]
    norms = [sx.StochNorm2d(8, backend=backend), sx.BatchGroupNorm2d(8, 4, backend=backend),
             sx.BatchGroupNorm2d(8, 16, backend=backend),
             sx.CrossIterationBatchNorm2d(8, window=3, burnin=1, backend=backend).bind(convs[3])]
    layers = [m for conv, norm in zip(convs, norms) for m in (conv, norm, nn.ReLU())]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_compile_every_layer_every_backend(backend):
    """torch.compile(fullgraph=True, backend='aot_eager') of a small net with every layer
    on the reference and cpu backends: 3 SGD steps give eager's losses, gradients and
    state. (The triton backend's ops are compiled in test_triton_backend.py.)"""
    torch._dynamo.reset()
    eager = _small_net(backend)
    compiled_model = copy.deepcopy(eager)
    compiled_loss = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    _assert_same_training(_train(eager, _loss, steps=3, image=(4, 3, 8, 8)),
                          _train(compiled_model, compiled_loss, steps=3, image=(4, 3, 8, 8)), 1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compile_converted_resnet18_matches_eager_cbn():
    """The same for CBN (bound convs, forward hooks, window buffers); slow: about a minute of
    compilation on 2 cores."""
    _compile_matches_eager("cbn")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compile_inductor_converted_resnet18():
    """Inductor once, on the BGN ResNet-18 (both groupings): close to eager, not equal
    (inductor fuses and reorders the float arithmetic of the surrounding ops). StochNorm
    works too, but for the same masks inductor needs torch._inductor.config.fallback_random,
    and the channels on the moving branch leave a fresh ResNet-18 unnormalised, so tiny
    rounding differences grow to ~1% in the gradients of some steps (reference and cpu
    backends alike): too ill-conditioned for a tight comparison."""
    _compile_matches_eager("bgn", backend="inductor", tol=1e-3)


# --------------------------------------------------------------------------- torch.export
@pytest.mark.timeout(600)
@pytest.mark.parametrize("key", list(RESNET_KINDS))
def test_export_eval_converted_resnet18(key):
    """torch.export.export of an eval-mode converted ResNet-18 (running statistics of real
    activations, see _resnet); the exported program gives the model's output on another
    input, channels_last included."""
    model = _resnet(key).eval()
    x = torch.randn(IMAGE)
    program = torch.export.export(model, (x,))
    other = torch.randn(IMAGE)
    with torch.no_grad():
        expected = model(other)
        torch.testing.assert_close(program.module()(other), expected, rtol=1e-4, atol=1e-4)
        cl = other.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(program.module()(cl), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- activation checkpointing
class _Checkpointed(nn.Module):
    """Runs ``block`` under torch.utils.checkpoint."""

    def __init__(self, block, use_reentrant):
        super().__init__()
        self.block, self.use_reentrant = block, use_reentrant

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=self.use_reentrant)


def _resnet_block(key):
    """ResNet-18's first layer2 block (a BasicBlock with a downsampling conv -> BN branch,
    built as torchvision builds it) behind a stem conv, converted: three norm layers, for
    CBN each bound to its conv."""
    from torchvision.models.resnet import BasicBlock, conv1x1
    kind, options = RESNET_KINDS[key]
    torch.manual_seed(0)
    block = BasicBlock(64, 128, stride=2, downsample=nn.Sequential(conv1x1(64, 128, 2), nn.BatchNorm2d(128)))
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), block)
    return sx.convert_model(model, kind, **options)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("key", list(RESNET_KINDS))
def test_checkpointing_converted_resnet_block(key, use_reentrant):
    """A converted ResNet block under activation checkpointing trains exactly like without
    it (3 steps): one training forward is one step although checkpointing recomputes it."""
    plain = _resnet_block(key)
    ckpt = copy.deepcopy(plain)
    ckpt[1] = _Checkpointed(ckpt[1], use_reentrant)
    runs = []
    for model in (plain, ckpt):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        losses, grads = [], []
        for step in range(3):
            x = torch.randn(2, 3, 8, 8, generator=g)
            torch.manual_seed(step)
            loss = model(x).square().mean()
            torch.manual_seed(1234)  # the recomputation must not depend on the RNG state
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        state = {k.replace("block.", ""): v.clone() for k, v in model.state_dict().items()}
        runs.append((losses, grads, state))
    (la, ga, sa), (lb, gb, sb) = runs
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=0, atol=0)
    for step_a, step_b in zip(ga, gb):
        for a, b in zip(step_a, step_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert sa.keys() == sb.keys()
    for key_ in sa:
        torch.testing.assert_close(sa[key_], sb[key_], rtol=0, atol=0, msg=key_)


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", LAYER_NAMES)
def test_deterministic_algorithms_bit_identical(name, backend):
    """Under torch.use_deterministic_algorithms(True) nothing raises on CPU and two runs from
    the same seed are bit-identical: outputs, gradients and state (the CPU kernels and the
    Triton kernels reduce in a fixed order, without atomics)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = _conv_norm_relu(name, backend)
            torch.manual_seed(3)
            inputs = [torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last), torch.randn(4, 3, 6, 6)]
            runs.append(_run_steps(model, inputs, seed=11))
    finally:
        torch.use_deterministic_algorithms(previous)
    (steps_a, state_a), (steps_b, state_b) = runs
    for (y, gx, grads), (y2, gx2, grads2) in zip(steps_a, steps_b):
        assert torch.equal(y, y2) and torch.equal(gx, gx2)
        assert all(torch.equal(g, g2) for g, g2 in zip(grads, grads2))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
