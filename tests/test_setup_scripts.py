"""The set-up scripts: ``--help`` at once, and ``scripts/setup_venv.sh`` redoing a step only
when its inputs changed (requirements-dev.txt; sources, setup.py, FORCE_CUDA, the built
library, the editable install pointing at the tree).

The skip logic runs in a copy of the tree whose ``.venv/bin/python`` is a stand-in: it runs
this suite's Python for ``setup.py --build-plan`` and ``-VV``, and records ``-m pip`` calls
instead of making them (a "build" writes a library and pip's install record), so no test
ever installs anything into a real environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip ${*:3}" >> .venv/pip-calls
  case " $* " in *" -e . "*)
    date +%s%N > stochnorm_ext/_C.fake-suffix.so
    record=.venv/lib/python3/site-packages/stochnorm_ext-0.1.0.dist-info
    mkdir -p "$record"
    printf '{"dir_info": {"editable": true}, "url": "file://%s"}' "$(pwd -P)" > "$record/direct_url.json"
  esac
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("script", ["run_main.sh", "run_tests.sh"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_at_once_without_set_up(tmp_path, script, flag):
    """--help prints the usage before (and without) any set-up step."""
    shutil.copytree(os.path.join(ROOT, "scripts"), tmp_path / "scripts")  # a tree with no .venv
    start = time.perf_counter()
    result = subprocess.run(["bash", str(tmp_path / "scripts" / script), "-x", flag], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 5
    assert result.stdout.startswith(f"usage: ./scripts/{script}"), result.stdout
    assert "==>" not in result.stdout + result.stderr and not (tmp_path / ".venv").exists()


@pytest.fixture
def tree(tmp_path):
    """A copy of what setup_venv.sh reads, with the stand-in .venv/bin/python."""
    for name in ("scripts", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), tmp_path / name)
    for name in ("setup.py", "pyproject.toml", "requirements-dev.txt", "README.md"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "stochnorm_ext").mkdir()
    shutil.copy(os.path.join(ROOT, "stochnorm_ext", "__init__.py"), tmp_path / "stochnorm_ext")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def _setup(tree, **env):
    """Run setup_venv.sh in the tree: (output, the pip calls it made)."""
    calls = tree / ".venv" / "pip-calls"
    calls.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")}
    environ.update(REAL_PYTHON=sys.executable, **env)
    result = subprocess.run(["bash", "scripts/setup_venv.sh"], cwd=tree, env=environ, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, (calls.read_text().splitlines() if calls.exists() else [])


def _installs(calls):
    return (any("-r requirements-dev.txt" in c for c in calls), any(c.endswith(" -e .") for c in calls))


@pytest.mark.slow  # about 15 runs of `setup.py --build-plan`, each importing torch
@pytest.mark.timeout(600)
def test_setup_redoes_only_what_changed(tree):
    out, calls = _setup(tree)
    assert _installs(calls) == (True, True), calls
    assert "torch 2.14.1 + torchvision 0.29.1" in out and "~3 GB" in out, out
    assert "compiling the C++ CPU kernels" in out and "~1-3 min on 2 cores" in out, out
    assert "built stochnorm_ext/_C.fake-suffix.so in" in out, out

    out, calls = _setup(tree)  # nothing changed
    assert calls == [], (calls, out)
    assert "requirements: unchanged" in out and "build: stochnorm_ext in .venv is current" in out, out

    with open(tree / "csrc" / "ops.cpp", "a") as f:  # a changed source
        f.write("\n// changed\n")
    out, calls = _setup(tree)
    assert _installs(calls) == (False, True), (calls, out)
    (tree / "csrc" / "cuda" / "tests" / "walk_check.cpp").write_text("// a host-side test, not built\n")

    if torch.cuda.is_available():  # a GPU visible: the CUDA kernels are wanted without FORCE_CUDA
        out, calls = _setup(tree, FORCE_CUDA="0")
        assert "not the CUDA kernels (FORCE_CUDA=0)" in out and _installs(calls) == (False, True), out
    else:  # FORCE_CUDA=0 builds what "no GPU" builds (and host-side tests are no input); FORCE_CUDA=1 does not
        out, calls = _setup(tree, FORCE_CUDA="0")
        assert calls == [], (calls, out)
        if torch.version.cuda is not None and shutil.which("nvcc"):
            out, calls = _setup(tree, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0")
            assert "the CUDA kernels (FORCE_CUDA=1) for sm_90" in out and _installs(calls) == (False, True), out
            out, calls = _setup(tree, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0;9.0")
            assert "for sm_80, sm_90" in out and _installs(calls) == (False, True), out
            out, calls = _setup(tree)  # back to the CPU build
            assert "not the CUDA kernels (no GPU is visible here" in out and _installs(calls) == (False, True)

    library = tree / "stochnorm_ext" / "_C.fake-suffix.so"
    library.write_text("rebuilt in place with other flags")  # the library is not the one built
    assert _installs(_setup(tree)[1]) == (False, True)
    library.unlink()  # no library at all
    assert _installs(_setup(tree)[1]) == (False, True)

    record = next((tree / ".venv" / "lib").glob("*/site-packages/*.dist-info/direct_url.json"))
    record.write_text('{"dir_info": {"editable": true}, "url": "file:///elsewhere"}')  # another tree's install
    assert _installs(_setup(tree)[1]) == (False, True)
    record.write_text(record.read_text().replace('"editable": true', '"editable": false'))  # a copy, not editable
    assert _installs(_setup(tree)[1]) == (False, True)

    with open(tree / "requirements-dev.txt", "a") as f:
        f.write("# changed\n")
    out, calls = _setup(tree)
    assert _installs(calls) == (True, False), (calls, out)
