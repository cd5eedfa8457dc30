#!/usr/bin/env bash
# Set up .venv, build stochnorm_ext, run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in *" --help "* | *" -h "*)  # at once: before (and without) the set-up
  cat <<'USAGE'
usage: ./scripts/run_tests.sh [PYTEST ARGUMENTS]

Runs scripts/setup_venv.sh first (.venv; the first time ~3 GB of packages to download and a
C++ build, a few minutes; later only what changed, seconds), then python -m pytest -q with the arguments
given, e.g. tests/test_modules.py, -k NAME, -x, -m "not slow" (pytest's own options:
.venv/bin/python -m pytest --help). Without a GPU, GPU tests skip and the Triton kernels run
under Triton's interpreter. Set-up switches (environment): FORCE_CUDA=1/0,
TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON.
USAGE
  exit 0 ;;
esac
bash scripts/setup_venv.sh
.venv/bin/python -m pytest -q "$@"
