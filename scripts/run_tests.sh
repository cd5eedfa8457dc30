#!/usr/bin/env bash
# Set up .venv, build stochnorm_ext, run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/python -m pytest -q "$@"
