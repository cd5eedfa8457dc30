#!/usr/bin/env bash
# Create (or reuse) .venv with everything needed to build, test and benchmark stochnorm_ext,
# then build the package into it in editable mode. Idempotent: each step says what it does
# and roughly how long it takes, and is skipped when its inputs have not changed since it
# last succeeded (stamps in .venv/): a second run with nothing changed takes seconds.
#   requirements: requirements-dev.txt and the venv's Python
#   build:        `python setup.py --build-plan`'s key (sources, setup.py, FORCE_CUDA,
#                 TORCH_CUDA_ARCH_LIST, GPU visible, torch), the built library itself and
#                 the editable install pointing at this tree
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=.venv/bin/python
say() { printf '==> %s\n' "$*"; }
took() { say "$1 in $((SECONDS - $2)) s"; }
hash_of() { sha256sum | cut -d' ' -f1; }

if [ ! -x "$PY" ]; then
  say "creating .venv with $("$PYTHON" --version 2>&1) (seconds)"
  "$PYTHON" -m venv .venv
fi

# 1. Requirements.
req_key=$({ cat requirements-dev.txt; "$PY" -VV; } | hash_of)
if [ "$(cat .venv/.stamp-requirements 2>/dev/null)" != "$req_key" ]; then
  say "installing requirements-dev.txt into .venv: torch 2.14.1 + torchvision 0.29.1 (a CUDA 13.0 build" \
      "of torch with its nvidia-* libraries: ~3 GB of wheels, ~6 GB in .venv; ~1-3 min from a local" \
      "mirror, longer over the internet; seconds if already there), triton, numpy, ninja, the test tools, matplotlib, scikit-learn, onnx/onnxruntime"
  start=$SECONDS
  set +e
  "$PY" -m pip install --disable-pip-version-check -r requirements-dev.txt \
    | grep --line-buffered -v '^Requirement already satisfied'
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || { say "installing requirements-dev.txt failed (pip's output above)"; exit 1; }
  echo "$req_key" > .venv/.stamp-requirements
  took "requirements installed" "$start"
else
  say "requirements: unchanged since the last install (requirements-dev.txt), skipped"
fi

# 2. Build (pip install -e .). Current when the plan's key and the built library are those of
# the last successful build and .venv's editable install points at this tree.
plan=$("$PY" setup.py --build-plan 2>.venv/build-plan.err) || { cat .venv/build-plan.err >&2; exit 1; }
build_key=$(sed -n 1p <<<"$plan")
library=$(ls stochnorm_ext/_C.*.so 2>/dev/null | head -n 1 || true)
library_hash=$([ -n "$library" ] && hash_of <"$library" || true)
# pip records where an install came from; an editable one of this tree reads the sources here.
editable_here=
for record in .venv/lib/python*/site-packages/stochnorm_ext-*.dist-info/direct_url.json; do
  if grep -qs "\"file://$(pwd -P)\"" "$record" && grep -qs '"editable": true' "$record"; then
    editable_here=yes
  fi
done
if [ -n "$library" ] && [ -n "$editable_here" ] \
   && [ "$(cat .venv/.stamp-build 2>/dev/null)" = "$build_key $library_hash" ]; then
  say "build: stochnorm_ext in .venv is current (no source, setup.py or build flag changed), skipped"
  exit 0
fi
say "building stochnorm_ext into .venv (pip install --no-build-isolation -e .): compiling $(sed -n 2p <<<"$plan")"
log=.venv/build.log
start=$SECONDS
# The build needs the installed torch, hence no build isolation. Two jobs: a 2-core machine.
# -v streams the compiler's progress ("[3/5] ... csrc/cpu/register_cpu.cpp"), shown one line per
# step; the whole log is in .venv/build.log, and its end is shown if the build fails.
set +e
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -v --disable-pip-version-check --no-build-isolation -e . 2>&1 \
  | tee "$log" | grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] | -shared .*-o ' \
  | sed -u -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c (/[^ ]*/)?([^ /]+\.(cpp|cu)) .*#  \1 \3#; s#.* -shared .*-o ([^ ]*/)?([^ /]+\.so).*#  linking \2#'
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  tail -n 60 "$log"
  say "the build failed (whole log: $log)"
  exit 1
fi
library=$(ls stochnorm_ext/_C.*.so | head -n 1)
echo "$build_key $(hash_of <"$library")" > .venv/.stamp-build
took "built $library" "$start"
