"""``python -m stochnorm_ext.selfcheck`` in a fresh process, as a user runs it (the suite's
own process has TRITON_INTERPRET set by conftest before anything loads; a user's has not),
what ``import stochnorm_ext`` loads, and what ``backends()``, the import and the self-check
say about a source tree without its compiled extension or a backend without its device."""
import glob
import importlib.machinery
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import stochnorm_ext as sx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=None, pythonpath=ROOT):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the self-check decides; conftest set it for this process
    env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_selfcheck_passes_in_a_fresh_process():
    result = _run("-m", "stochnorm_ext.selfcheck")
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "FAIL" not in result.stdout and result.stdout.count("PASS") >= 10, report
    if not torch.cuda.is_available():  # the Triton kernels ran, under the interpreter
        assert "PASS cpu  triton" in result.stdout, report
        # cuda: compiled in (CI's FORCE_CUDA=1 build) or not, never checked without a GPU
        assert "NOT checked  cuda      " in result.stdout, report
        cuda = sx.backends()["cuda"]
        assert "no CUDA device" in cuda or "not compiled in" in cuda, cuda
    assert "checked      cpu       on cpu" in result.stdout and "checked      reference on cpu" in result.stdout, report


def test_import_loads_neither_dynamo_nor_triton():
    """``import stochnorm_ext`` must not import torch._dynamo (over a second) nor, without a
    GPU, Triton: the self-check sets TRITON_INTERPRET after the package is imported, and
    Triton kernels defined before that would not run under the interpreter."""
    code = ("import sys, stochnorm_ext; "
            "print(sorted(m for m in sys.modules if m == 'torch._dynamo' or m.split('.')[0] == 'triton'))")
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    assert "torch._dynamo" not in loaded, loaded
    if not torch.cuda.is_available():
        assert loaded == [], loaded


def test_compiled_in_is_not_usable_without_a_gpu(monkeypatch):
    """backends() says "compiled in, but not usable here" for CUDA kernels on a machine
    without a GPU (it used to list them as available), and the Triton kernels are not usable
    on such a machine outside the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from stochnorm_ext import backend as registry
    monkeypatch.setitem(registry._loaded, "cuda", types.ModuleType("compiled_in_cuda_backend"))
    monkeypatch.delitem(registry._missing, "cuda", raising=False)
    reason = sx.backends()["cuda"]
    assert reason and reason.startswith("compiled in, but not usable here: no CUDA device"), reason
    assert "cuda" not in sx.available_backends()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = sx.backends()["triton"]
    assert reason and "no CUDA device" in reason and "TRITON_INTERPRET=1" in reason, reason


def _unbuilt_tree(tmp_path):
    """A copy of the source tree without its compiled extension, and beside it an "installed"
    stochnorm_ext that has one (only its library's presence matters here)."""
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "stochnorm_ext"), tree / "stochnorm_ext",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    assert not glob.glob(str(tree / "stochnorm_ext" / "_C*"))
    installed = tmp_path / "site" / "stochnorm_ext"
    installed.mkdir(parents=True)
    (installed / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not loaded")
    return tree, installed


def test_source_tree_without_its_extension(tmp_path):
    """Python started in a source tree without its build imports that tree: backends() and
    a one-time warning say, in plain words, that the compiled kernels are not built there,
    that they hide an installed copy, and how to fix it (it used to say "cannot import name
    '_C' ... circular import", or load another tree's library); the layers fall back to the
    reference."""
    tree, installed = _unbuilt_tree(tmp_path)
    code = ("import stochnorm_ext as sx, torch\n"
            "print('FILE', sx.__file__)\n"
            "for name, reason in sx.backends().items(): print('BACKEND', name, reason)\n"
            "import stochnorm_ext; sx.backends()\n"
            "print('OUT', tuple(sx.StochNorm2d(4)(torch.randn(3, 4, 2, 2)).shape))\n")
    result = _run("-c", code, cwd=str(tree), pythonpath=str(installed.parent))
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert f"FILE {tree / 'stochnorm_ext' / '__init__.py'}" in result.stdout, report
    assert "OUT (3, 4, 2, 2)" in result.stdout, report
    cpu = next(line for line in result.stdout.splitlines() if line.startswith("BACKEND cpu "))
    for words in ("not built in this source tree", f"hides the stochnorm_ext installed at {installed}",
                  "build_ext --inplace", "pip install --no-build-isolation -e .", "from another directory"):
        assert words in cpu, (words, cpu)
    assert "circular import" not in report, report
    assert "BACKEND reference None" in result.stdout, report
    warning = "RuntimeWarning: stochnorm_ext runs on the pure-PyTorch reference: the compiled C++ kernels"
    assert result.stderr.count(warning) == 1, result.stderr


def test_selfcheck_without_the_extension_says_so_and_fails(tmp_path):
    """In a source tree without its build the self-check lists what it could not check and
    why, and exits with 2 (it said "11 passed, 0 failed" and exited 0) unless told that the
    reference alone is fine."""
    tree, installed = _unbuilt_tree(tmp_path)
    result = _run("-m", "stochnorm_ext.selfcheck", cwd=str(tree), pythonpath=str(installed.parent))
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 2, report
    assert "checked      reference on cpu" in result.stdout, report
    assert "NOT checked  cpu       the compiled C++ kernels (stochnorm_ext._C) are not built" in result.stdout, report
    assert "NO COMPILED KERNELS CHECKED" in result.stdout and "--allow-reference-only" in result.stdout, report
    assert "FAIL" not in result.stdout, report
    allowed = _run("-m", "stochnorm_ext.selfcheck", "--allow-reference-only", cwd=str(tree),
                   pythonpath=str(installed.parent))
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    assert "NO COMPILED KERNELS CHECKED" in allowed.stdout
