"""Deploying without the extension: torch.export and ONNX export of converted models, and an
exported program run where stochnorm_ext is not importable.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import stochnorm_ext as se
from stochnorm_ext import (BatchGroupNorm2d, BatchGroupNorm3d, StochNorm2d, StochNorm3d, fold_into_conv, to_batchnorm)

from deploy_helpers import close, make_input, randomise_affine, train, trained_resnet


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
