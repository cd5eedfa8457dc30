"""Deploying without the extension: to_batchnorm, fold_into_conv, export (torch.export, ONNX)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import stochnorm_ext as se
from stochnorm_ext import (BatchGroupNorm1d, BatchGroupNorm2d, BatchGroupNorm3d, Conv2dCBN,
                           PiecewiseAffine, StochNorm1d, StochNorm2d, StochNorm3d,
                           fold_into_conv, to_batchnorm)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CL = {4: torch.channels_last, 5: torch.channels_last_3d}
MIXED_GROUPS = lambda C: 2 * C if C <= 128 else C // 4  # noqa: E731  pieces early, groups later


# --------------------------------------------------------------------------- helpers
def our_layers(model):
    """Modules of stochnorm_ext's layer classes (PiecewiseAffine is plain PyTorch)."""
    return [type(m).__name__ for m in model.modules()
            if type(m).__module__.startswith("stochnorm_ext") and not isinstance(m, PiecewiseAffine)]


def our_hooks(model):
    return [h for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
            for h in d.values() if type(h).__module__.startswith("stochnorm_ext")]


def make_input(shape, device="cpu", dtype=torch.float32):
    """Data with a different mean and spread per channel."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    offset = torch.linspace(-2, 3, C).view(view)
    spread = torch.linspace(0.5, 2, C).view(view)
    return (torch.randn(shape) * spread + offset).to(device, dtype)


def train(model, inputs, steps=3, lr=1e-2):
    """A few SGD steps, so running statistics and affine parameters are non-trivial."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if params else None
    for _ in range(steps):
        out = model(inputs())
        if opt is not None:
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    model.eval()
    return model


def randomise_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "affine", False):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


def close(actual, expected, tol=1e-5):
    """Equal within float32 rounding, relative to the output's magnitude."""
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


# --------------------------------------------------------------------------- per layer
LAYERS = {  # name: (constructor, input shape, expected replacement)
    "stoch1d": (lambda: StochNorm1d(6), (5, 6), nn.BatchNorm1d),
    "stoch1d-L": (lambda: StochNorm1d(6, momentum=None), (3, 6, 5), nn.BatchNorm1d),
    "stoch2d": (lambda: StochNorm2d(6, eps=1e-3), (2, 6, 4, 4), nn.BatchNorm2d),
    "stoch3d": (lambda: StochNorm3d(6, affine=False), (2, 6, 2, 3, 4), nn.BatchNorm3d),
    "bgn1d-groups": (lambda: BatchGroupNorm1d(6, 3), (3, 6, 8), nn.BatchNorm1d),
    "bgn1d-pieces": (lambda: BatchGroupNorm1d(6, 12), (3, 6, 8), PiecewiseAffine),
    "bgn2d-groups": (lambda: BatchGroupNorm2d(6, 2, eps=1e-3), (2, 6, 4, 4), nn.BatchNorm2d),
    "bgn2d-one": (lambda: BatchGroupNorm2d(6, 1), (2, 6, 4, 4), nn.BatchNorm2d),
    "bgn2d-pieces": (lambda: BatchGroupNorm2d(6, 18), (2, 6, 6, 4), PiecewiseAffine),
    "bgn2d-pieces-noaffine": (lambda: BatchGroupNorm2d(6, 12, affine=False), (2, 6, 4, 4), PiecewiseAffine),
    "bgn3d-groups": (lambda: BatchGroupNorm3d(6, 3, momentum=None), (2, 6, 2, 3, 4), nn.BatchNorm3d),
    "bgn3d-pieces": (lambda: BatchGroupNorm3d(6, 12), (2, 6, 2, 3, 4), PiecewiseAffine),
}
FORMATS = ["contiguous", "channels_last"]


def trained_layer(name, device="cpu", dtype=torch.float32):
    make, shape, _ = LAYERS[name]
    model = nn.Sequential(make()).to(device, dtype)
    randomise_affine(model)
    return train(model, lambda: make_input(shape, device, dtype)), shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,fmt", [(name, fmt) for name, (_, shape, _) in LAYERS.items()
                                      for fmt in FORMATS if fmt == "contiguous" or len(shape) in CL])
def test_to_batchnorm_layer(name, fmt, device):
    model, shape = trained_layer(name, device)
    old = model[0]
    x = make_input(shape, device)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=CL[len(shape)])
    expected = model(x)
    deployed = to_batchnorm(model)
    new = deployed[0]
    assert type(new) is LAYERS[name][2]
    assert our_layers(deployed) == [] and our_hooks(deployed) == []
    assert type(model[0]) is type(old)  # the original is untouched (not inplace)
    out = deployed(x)
    close(out, expected)
    if fmt == "channels_last":
        assert out.is_contiguous(memory_format=CL[len(shape)])
    # Copies on the same device and dtype; hyper-parameters carried over.
    old_ptrs = {t.data_ptr() for t in list(old.parameters()) + list(old.buffers())}
    for t in list(new.parameters()) + list(new.buffers()):
        assert t.data_ptr() not in old_ptrs
        assert t.device == old.running_mean.device
        assert t.dtype == old.running_mean.dtype or t.dtype == torch.long
    if isinstance(new, nn.modules.batchnorm._BatchNorm):
        assert (new.eps, new.momentum, new.affine) == (old.eps, old.momentum, old.affine)
        assert new.track_running_stats and int(new.num_batches_tracked) == int(old.num_batches_tracked)


def test_bgn_groups_expand_running_stats():
    model, _ = trained_layer("bgn2d-groups")
    bn = to_batchnorm(model)[0]
    torch.testing.assert_close(bn.running_mean, model[0].running_mean.repeat_interleave(3))
    torch.testing.assert_close(bn.running_var, model[0].running_var.repeat_interleave(3))


def test_keeps_training_flag_and_dtype():
    model, shape = trained_layer("stoch2d", dtype=torch.float64)
    model.add_module("pieces", BatchGroupNorm2d(6, 12).double().eval())
    model[0].train()
    deployed = to_batchnorm(model)
    assert deployed[0].training and not deployed.training and not deployed.pieces.training
    assert all(t.dtype == torch.float64 for t in deployed.parameters())
    assert deployed[0].running_mean.dtype == torch.float64
    assert deployed.pieces.scale.dtype == torch.float64


def test_root_layer_and_inplace():
    layer, shape = trained_layer("bgn2d-pieces")
    layer = layer[0]
    x = make_input(shape)
    expected = layer(x)
    new = to_batchnorm(layer)
    assert isinstance(new, PiecewiseAffine)
    close(new(x), expected)
    model = nn.Sequential(copy.deepcopy(layer), nn.ReLU())
    assert to_batchnorm(model, inplace=True) is model and isinstance(model[0], PiecewiseAffine)


def test_bgn_without_running_stats_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(BatchGroupNorm2d(4, 2, track_running_stats=False)))
    with pytest.raises(ValueError, match=r"'1\.0' \(BatchGroupNorm2d\).*track_running_stats=False"):
        to_batchnorm(model, inplace=True)
    assert isinstance(model[1][0], BatchGroupNorm2d)  # nothing changed
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fold_into_conv(model.eval())


def test_piecewise_affine_limits():
    layer, _ = trained_layer("bgn2d-pieces")
    new = to_batchnorm(layer)[0]
    with pytest.raises(ValueError, match="not a multiple of the 3 pieces"):
        new(torch.randn(2, 6, 4, 4))
    with pytest.raises(ValueError, match=r"expected input \(N, 6, \.\.\.\)"):
        new(torch.randn(2, 5, 6, 4))
    x = make_input((2, 6, 6, 4))
    close(new(x.half()).float(), new(x), tol=1e-2)
    assert new(x.half()).dtype == torch.float16
    with pytest.raises(RuntimeError, match="cannot train"):
        new.train()(x)


# --------------------------------------------------------------------------- CBN
def test_cbn_bound_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4))
    se.convert_model(model, "cbn", window=3)
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 8, 8)), steps=4)
    assert our_hooks(model)  # convert_model bound the convs
    x = make_input((2, 3, 8, 8))
    expected = model(x)
    deployed = to_batchnorm(model)
    assert our_layers(deployed) == [] and our_hooks(deployed) == []
    assert isinstance(deployed[1], nn.BatchNorm2d) and isinstance(deployed[4], nn.BatchNorm2d)
    close(deployed(x), expected)
    xc = x.contiguous(memory_format=torch.channels_last)
    close(deployed(xc), model(xc))
    assert our_hooks(model)  # the original keeps its binding
    model.train()(x)  # and still trains


def test_conv2d_cbn_module():
    model = nn.Sequential(Conv2dCBN(3, 6, 3, padding=1, window=2), nn.ReLU())
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 6, 6)), steps=3)
    x = make_input((2, 3, 6, 6))
    deployed = to_batchnorm(model)
    assert our_layers(deployed) == []
    assert isinstance(deployed[0].conv, nn.Conv2d) and isinstance(deployed[0].norm, nn.BatchNorm2d)
    keys = {k for k in model.state_dict() if not k.startswith("0.norm.window_") and k != "0.norm.step"}
    assert keys == set(deployed.state_dict())
    close(deployed(x), model(x))
    folded = fold_into_conv(model)
    assert isinstance(folded[0].norm, nn.Identity)
    close(folded(x), model(x))


def test_cbn_without_running_stats_uses_batch_stats():
    model = nn.Sequential(Conv2dCBN(3, 4, 1, window=1, track_running_stats=False)).eval()
    x = make_input((2, 3, 5, 5))
    deployed = to_batchnorm(model)
    assert deployed[0].norm.running_mean is None
    close(deployed(x), model(x))
    assert fold_into_conv(model)[0].norm.__class__ is nn.BatchNorm2d  # nothing to fold


# --------------------------------------------------------------------------- resnet18
RESNET_KINDS = {
    "stochnorm": ("stochnorm", {}),
    "bgn32": ("bgn", {"num_groups": 32}),
    "bgn-mixed": ("bgn", {"num_groups": MIXED_GROUPS}),
    "cbn": ("cbn", {"window": 2}),
}
_RESNETS = {}


def trained_resnet(key):
    """resnet18(weights=None) converted and trained two steps (built once per kind)."""
    if key not in _RESNETS:
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(1)
        kind, options = RESNET_KINDS[key]
        model = se.convert_model(torchvision.models.resnet18(weights=None, num_classes=10), kind, **options)
        x = torch.randn(2, 3, 32, 32)

        def step_loss():
            return nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(2):
            opt.zero_grad()
            step_loss().backward()
            opt.step()
        _RESNETS[key] = model.eval()
    return _RESNETS[key]


@pytest.mark.parametrize("key", list(RESNET_KINDS))
def test_resnet18(key):
    model = trained_resnet(key)
    x = torch.randn(2, 3, 32, 32)
    xc = x.contiguous(memory_format=torch.channels_last)
    expected = model(x)
    deployed = to_batchnorm(model)
    assert our_layers(deployed) == [] and our_hooks(deployed) == []
    close(deployed(x), expected)
    close(deployed(xc), model(xc))
    folded = fold_into_conv(model)
    assert type(folded) is type(model)
    assert not any(m.training for m in list(deployed.modules()) + list(folded.modules()))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    n_pieces = sum(isinstance(m, PiecewiseAffine) for m in folded.modules())
    assert n_pieces == (10 if key == "bgn-mixed" else 0)  # 64- and 128-channel BGNs have G = 2C
    close(folded(x), expected, tol=1e-4)
    close(folded(xc), expected, tol=1e-4)
    assert our_layers(model)  # the input model is untouched


# --------------------------------------------------------------------------- fold_into_conv
class ConvTwice(nn.Module):
    """The conv's output feeds the BN and a residual: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fold_small_models(dims):
    Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    Stoch = {1: StochNorm1d, 2: StochNorm2d, 3: StochNorm3d}[dims]
    BGN = {1: BatchGroupNorm1d, 2: BatchGroupNorm2d, 3: BatchGroupNorm3d}[dims]
    model = nn.Sequential(
        BN(3),                                   # 0: not preceded by a conv: stays
        Conv(3, 8, 3, padding=1, bias=True), Stoch(8), nn.ReLU(),           # 1-3
        Conv(8, 8, 3, padding=1, groups=4, bias=False), BGN(8, 4), nn.ReLU(),  # 4-6
        Conv(8, 4, 1), BGN(4, 8),                # 7-8: pieces: stays after the conv
        Conv(4, 4, 1), BN(4),                    # 9-10: plain BN is folded too
    )
    shape = (2, 3) + (4,) * dims
    randomise_affine(model)
    train(model, lambda: make_input(shape), steps=3)
    x = make_input(shape)
    expected = model(x)
    folded = fold_into_conv(model)
    kinds = [type(m).__name__ for m in folded]
    assert kinds[0] == BN.__name__ and kinds[8] == "PiecewiseAffine"
    assert [kinds[i] for i in (2, 5, 10)] == ["Identity"] * 3
    assert folded[4].bias is not None and folded[4].groups == 4
    close(folded(x), expected, tol=1e-4)
    if dims > 1:
        xc = x.contiguous(memory_format=CL[x.dim()])
        close(folded(xc), expected, tol=1e-4)


def test_fold_keeps_unfoldable_pairs():
    model = ConvTwice()
    train(model, lambda: make_input((2, 3, 5, 5)))
    x = make_input((2, 3, 5, 5))
    folded = fold_into_conv(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    close(folded(x), model(x))
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.BatchNorm2d(3), shared, nn.BatchNorm2d(3))
    train(model, lambda: make_input((2, 3, 5, 5)))
    folded = fold_into_conv(model)
    assert all(isinstance(m, nn.BatchNorm2d) for m in (folded[1], folded[3]))
    close(folded(x), model(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = StochNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_fold_untraceable_model_raises():
    with pytest.raises(RuntimeError, match="torch.fx cannot trace Untraceable.*to_batchnorm alone"):
        fold_into_conv(Untraceable().eval())


def test_fold_needs_eval():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), StochNorm2d(4))
    with pytest.raises(ValueError, match="training mode.*eval"):
        fold_into_conv(model, inplace=True)
    assert isinstance(model[1], StochNorm2d)


# --------------------------------------------------------------------------- export
def _aten_only(graph):
    import operator
    bad = [str(n.target) for n in graph.nodes if n.op == "call_function"
           and not (n.target is operator.getitem
                    or (isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"))]
    assert bad == [], f"non-aten ops in the exported graph: {bad}"
    assert "stochnorm" not in str(graph)


@pytest.mark.parametrize("key", ["bgn-mixed", "cbn"])
def test_torch_export(key):
    model = trained_resnet(key)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    for deployed in (to_batchnorm(model), fold_into_conv(model)):
        program = torch.export.export(deployed, (x,))
        _aten_only(program.graph)
        close(program.module()(x), expected, tol=1e-4)


def test_exported_program_runs_without_stochnorm_ext(tmp_path):
    """A fresh interpreter where importing stochnorm_ext fails loads and runs the program."""
    model = trained_resnet("bgn-mixed")  # BatchNorm and PiecewiseAffine
    x = torch.randn(2, 3, 32, 32)
    torch.export.save(torch.export.export(to_batchnorm(model), (x,)), tmp_path / "model.pt2")
    torch.save({"x": x, "expected": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["stochnorm_ext"] = None  # any import of it raises
        import torch
        program = torch.export.load({str(tmp_path / "model.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = program.module()(io["x"])
        tol = 1e-4 * (io["expected"].abs().max().item() + 1)
        torch.testing.assert_close(out, io["expected"], rtol=1e-4, atol=tol)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _onnx_check(model, x, expected, path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxscript)")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed; torch.onnx.export needs it")
    import onnx
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    domains = {(node.domain, node.op_type) for node in proto.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in domains), domains
    assert not any("stochnorm" in op.lower() or "piecewise" in op.lower() for _, op in domains)
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    close(torch.from_numpy(out), expected, tol=1e-4)


def test_onnx_resnet18(tmp_path):
    model = trained_resnet("bgn-mixed")
    x = torch.randn(2, 3, 32, 32)
    _onnx_check(to_batchnorm(model), x, model(x), tmp_path / "resnet18.onnx")


def test_onnx_small_3d(tmp_path):
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), StochNorm3d(4), nn.ReLU(),
                          nn.Conv3d(4, 4, 1), BatchGroupNorm3d(4, 8), nn.Conv3d(4, 2, 1), BatchGroupNorm3d(2, 1))
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 2, 4, 4)))
    x = make_input((2, 3, 2, 4, 4))
    _onnx_check(fold_into_conv(model), x, model(x), tmp_path / "small3d.onnx")


def test_onnx_unfolded_converted_model(tmp_path):
    # Without to_batchnorm / fold_into_conv: every layer exports (eval: BatchNorm's map for
    # StochNorm and CBN, BGN's per-group map for both groupings) and runs in onnxruntime.
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), StochNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          BatchGroupNorm2d(4, 2), nn.ReLU(), nn.Conv2d(4, 4, 1), BatchGroupNorm2d(4, 8), conv,
                          se.CrossIterationBatchNorm2d(4, window=2).bind(conv))
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 4, 4)))
    model.eval()
    x = make_input((2, 3, 4, 4))
    _onnx_check(model, x, model(x), tmp_path / "unfolded.onnx")


def test_to_batchnorm_keeps_a_shared_layer_shared():
    norm = StochNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm, nn.ReLU(), nn.Conv2d(4, 4, 1), norm)
    randomise_affine(model)
    train(model, lambda: make_input((2, 3, 4, 4)))
    x = make_input((2, 3, 4, 4))
    deployed = to_batchnorm(model)
    assert type(deployed[1]) is nn.BatchNorm2d and deployed[4] is deployed[1]
    close(deployed(x), model(x))
