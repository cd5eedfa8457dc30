#!/usr/bin/env bash
# Set up .venv, build stochnorm_ext and run the main job (extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/python -m stochnorm_ext.bench "$@"
