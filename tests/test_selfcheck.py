"""``python -m stochnorm_ext.selfcheck`` in a fresh process, as a user runs it (the suite's
own process has TRITON_INTERPRET set by conftest before anything loads; a user's has not),
and what ``import stochnorm_ext`` loads."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the self-check decides; conftest set it for this process
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_selfcheck_passes_in_a_fresh_process():
    result = _run("-m", "stochnorm_ext.selfcheck")
    report = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, report
    assert "FAIL" not in result.stdout and result.stdout.count("PASS") >= 10, report
    if not torch.cuda.is_available():  # the Triton kernels ran, under the interpreter
        assert "PASS cpu  triton" in result.stdout, report


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
