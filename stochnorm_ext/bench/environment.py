"""The machine a run measured: versions, commit, load, the CPU threads chosen for the load,
and the command line as one can re-run it (no absolute path of this machine in any output)."""
from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

import torch

import stochnorm_ext as sx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# An absolute path of two or more parts, at the start of a word, quote, bracket or option value.
_ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(\[=,`])/(?:[^\s/'\"()\[\],:;`]+/)+([^\s/'\"()\[\],:;`]*)")


def scrub_paths(text: str) -> str:
    """``text`` without absolute paths of this machine: the repository and the working
    directory become ``.``, the Python prefix ``<python>``, the home directory ``~``; any
    other absolute path is cut to ``.../`` + its last part."""
    roots = {REPO_ROOT: ".", os.getcwd(): ".", sys.prefix: "<python>", os.path.expanduser("~"): "~"}
    for root in sorted(roots, key=len, reverse=True):
        if len(root) > 1:
            text = text.replace(root + os.sep, roots[root] + "/").replace(root, roots[root])
    return _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(1), text)


def _portable_argument(arg: str) -> str:
    """A command-line argument as it re-runs from the working directory: an absolute path
    inside it relative, one outside it its file name."""
    option, sep, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if os.path.isabs(value):
        inside = os.path.commonpath([os.getcwd(), os.path.abspath(value)]) == os.getcwd()
        value = os.path.relpath(value) if inside else os.path.basename(value)
    return option + sep + value


def command_line(argv: Sequence[str]) -> str:
    """The re-run command: ``python -m stochnorm_ext.bench`` and the arguments given."""
    return " ".join(["python -m stochnorm_ext.bench"] + [shlex.quote(_portable_argument(a)) for a in argv])


def load_average() -> Optional[List[float]]:
    """1/5/15-minute load averages: timings on a busy machine are not to be trusted."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def available_cores() -> int:
    """The CPU cores this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def choose_threads(cores: int, load: Optional[float], torch_default: int) -> Tuple[int, str]:
    """The CPU threads to time with, and why. OpenMP threads wait for each other at every
    parallel region: when one of them is descheduled (another process wants its core) the
    others spin until it runs again, so timings jump by scheduler slices. Hence 1 thread on
    2 cores or fewer, or when fewer than 2 cores are idle; else the idle cores (at most
    torch's default)."""
    load_text = "unknown" if load is None else f"{load:.2f}"
    if cores <= 2:
        return 1, f"{cores} core{'s' if cores != 1 else ''} available (1 thread on 2 cores or fewer); load average {load_text}"
    idle = cores if load is None else cores - load
    if idle < 2:
        return 1, f"busy: load average {load_text} on {cores} cores (1 thread when fewer than 2 are idle)"
    threads = max(1, min(torch_default, int(idle)))
    return threads, f"load average {load_text} on {cores} cores: the idle ones, at most torch's {torch_default}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Tuple[str, bool]:
    """The short commit of the source tree this module runs from, and whether it is dirty."""
    try:
        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        return commit, bool(status)
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)", False


def environment_info(argv: Sequence[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    commit, dirty = git_commit()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    backends = {name: None if why is None else scrub_paths(why) for name, why in sx.backends().items()}
    return dict(torch=torch.__version__, triton=triton_version,
                cuda=(torch.version.cuda or "none") + ("" if torch.cuda.is_available() else " (build; no GPU here)"),
                cudnn=cudnn if cudnn else "none", python=platform.python_version(), commit=commit,
                dirty=dirty, stochnorm_ext=sx.__version__, backends=backends,
                command=command_line(argv), devices={}, cores_available=available_cores(),
                load_average_at_start=load_average())


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''} of {available_cores()} cores"
