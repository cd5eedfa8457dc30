#!/usr/bin/env bash
# Create (or reuse) .venv with everything needed to build, test and benchmark stochnorm_ext,
# then build the package into it in editable mode. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# The build needs the installed torch, hence no build isolation. Two jobs: a 2-core machine.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --disable-pip-version-check \
  --no-build-isolation -e .
