#!/usr/bin/env bash
# Set up .venv, build stochnorm_ext and run the main job (extra arguments go to it):
# python -m stochnorm_ext.bench, which checks every backend against the reference, then times them.
set -euo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then  # at once: before (and without) the set-up
    cat <<'USAGE'
usage: ./scripts/run_main.sh [BENCHMARK OPTIONS]

Sets up .venv (scripts/setup_venv.sh: the first time ~3 GB of packages to download and a C++ build, a few
minutes; later only what changed, seconds), then runs python -m stochnorm_ext.bench with the
options given: the self-check of every backend against the reference, then the benchmark.
Set-up switches (environment): FORCE_CUDA=1/0, TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON.

USAGE
    if [ -x .venv/bin/python ] && PYTHONWARNINGS=ignore .venv/bin/python -m stochnorm_ext.bench --help; then
      exit 0
    fi
    echo "The benchmark's own options are listed here once .venv is set up (see README.md)."
    exit 0
  fi
done
bash scripts/setup_venv.sh
.venv/bin/python -m stochnorm_ext.bench "$@"
