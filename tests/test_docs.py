"""The README runs as written, and the repository names no path of the machine it was made on.

Every ```python block of README.md runs, as a user pastes it, in a fresh process outside the
source tree (pretrained weights replaced by ``weights=None``: no download). Every ```bash
block's commands exist: scripts are there and executable, ``python -m`` modules exist and
know the flags given, ``python -c`` commands run.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def _blocks(language: str):
    with open(README) as f:
        text = f.read()
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def _user_env():
    """The environment of a user's process: none of the suite's switches (conftest sets
    TRITON_INTERPRET and output poisoning), the package importable as installed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "STOCHNORM_EXT_POISON_OUTPUTS", "STOCHNORM_EXT_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# Runs each block in a namespace of its own, in one process (an import of torch per block
# would cost seconds each); a failure names the block and shows its traceback.
_RUNNER = r"""
import sys, traceback
blocks = eval(sys.stdin.read())
for i, code in enumerate(blocks):
    try:
        exec(compile(code, f"<README python block {i}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"README python block {i} failed:\n{code}", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"block {i} ok", flush=True)
"""


def _offline(code: str) -> str:
    return re.sub(r"weights=\"[A-Za-z0-9_]+\"", "weights=None", code)


def _run_blocks(blocks, cwd):
    return subprocess.run([sys.executable, "-c", _RUNNER], input=repr([_offline(b) for b in blocks]),
                          cwd=cwd, env=_user_env(), capture_output=True, text=True, timeout=600)


def test_readme_has_python_blocks():
    blocks = _blocks("python")
    assert len(blocks) >= 5, len(blocks)
    assert any("SF.batch_group_norm" in b for b in blocks)
    assert any("torch.set_rng_state" in b for b in blocks)


@pytest.mark.timeout(600)
def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = _blocks("python")
    result = _run_blocks(blocks, tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert result.stdout.count(" ok") == len(blocks), result.stdout


def test_readme_resume_needs_the_rng_state(tmp_path):
    """The README's exact-resume snippet checks what it claims: without restoring the RNG
    state, the resumed StochNorm steps differ (other masks) and its assert fails."""
    (block,) = [b for b in _blocks("python") if "torch.set_rng_state" in b]
    without = "\n".join(line for line in block.splitlines() if "torch.set_rng_state" not in line)
    assert without != block
    result = _run_blocks([without], tmp_path)
    assert result.returncode == 1 and "AssertionError" in result.stderr, (result.stdout + result.stderr)[-3000:]


def _commands():
    """The commands of the README's bash blocks, continuation lines joined, comments dropped."""
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield shlex.split(line, comments=True)


def test_readme_bash_commands_exist(tmp_path):
    commands = list(_commands())
    assert any(c[0] == "./scripts/run_tests.sh" for c in commands), commands
    assert any(c[0] == "./scripts/run_main.sh" for c in commands), commands
    for argv in commands:
        if argv[0].startswith("./"):
            path = os.path.join(ROOT, argv[0])
            assert os.path.isfile(path) and os.access(path, os.X_OK), f"{argv[0]} is missing or not executable"
        elif argv[0] == "python" and argv[1] == "-m":
            module = argv[2]
            source = module.replace(".", os.sep) + ".py"
            assert os.path.isfile(os.path.join(ROOT, source)), f"no module {module}"
            with open(os.path.join(ROOT, source)) as f:
                text = f.read()
            for flag in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
                assert f'"{flag}"' in text, f"{module} has no option {flag}"
        elif argv[0] == "python" and argv[1] == "-c":
            result = subprocess.run([sys.executable, "-c", argv[2]], cwd=tmp_path, env=_user_env(),
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{argv}:\n{result.stderr[-3000:]}"
        else:
            assert argv[0] == "pip", f"the test does not know how to check {argv}"


def test_readme_paths_exist():
    """Every scripts/, examples/, benchmarks/, tests/, stochnorm_ext/, docs/ ... file the README names is there."""
    with open(README) as f:
        text = f.read()
    names = set(re.findall(r"(?<![\w/.-])((?:scripts|examples|benchmarks|tests|csrc|stochnorm_ext|docs|\.ci)"
                           r"/[\w./-]*\w)", text))
    assert "scripts/setup_venv.sh" in names, names
    missing = sorted(n for n in names if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, missing


# An absolute path under a home, work or scratch folder: where this copy was made, not where
# a reader's is. (/usr/local/cuda and the like are conventional locations, not matched.)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp|Users|mnt|scratch)/")


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="not a git checkout")
def test_no_machine_specific_paths():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    found = []
    for name in filter(None, files):
        path = os.path.join(ROOT, name)
        if name == "tests/test_docs.py" or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data:  # binary (a plot)
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{name}:{number}: {line.strip()[:160]}")
    assert not found, "machine-specific absolute paths:\n" + "\n".join(found)


def test_machine_path_pattern():
    assert MACHINE_PATH.search("cd /work/main && x") and MACHINE_PATH.search("-o /tmp/walk_check")
    assert MACHINE_PATH.search('"/home/me/x"') and MACHINE_PATH.search("PYTHONPATH=/root/a")
    assert not MACHINE_PATH.search("CUDA_HOME=/usr/local/cuda") and not MACHINE_PATH.search("a/work/b")
    assert not MACHINE_PATH.search("~/tmp/") and not MACHINE_PATH.search("file:///opt/x")
