#!/usr/bin/env bash
# One-shot validation of stochnorm_ext on a CUDA GPU (H100/H200 with torch, triton, nvcc,
# pytest-xdist, compute-sanitizer preinstalled). Run from the repository root:
#
#   OUT=/some/dir bash scripts/gpu_validate.sh        (BUDGET=seconds, default 420)
#
# It keeps its own deadline and skips the optional stages that would not fit, so that the
# logs always come back: $OUT/summary.txt (one line per stage) and $OUT/logs.tgz.
#   0 env        versions, GPU, tools
#   1 triton     the Triton test files on the GPU (no build needed: runs during the build)
#   2 build      setup.py build_ext --inplace for sm_90 with ptxas -v (registers, spills)
#   3 smoke      one tiny step per backend with CUDA_LAUNCH_BLOCKING=1
#   4 parallel   the rest of the suite (GPU parameters run, -n workers) | compute-sanitizer
#                memcheck then racecheck on the CUDA backend's shared tests
#   5 alone      scripts/gpu_probe_perf.py (kernels per step, eager vs CUDA-graph time),
#                the bench's small-batch section and a reduced large-shape bench on cuda
# SKIP_BUILD=1 keeps an existing build (a rerun on a warm machine); TESTS="files..." narrows
# stage 4 to those test files (a rerun after a fix).
set -u
START=$(date +%s)
BUDGET=${BUDGET:-420}
DEADLINE=$((START + BUDGET))
REPO=$(pwd)
RESULTS=${OUT:-$REPO/gpu_out}
mkdir -p "$RESULTS"
W=$(mktemp -d -t gpuval.XXXXXX)
LOGS="$W/logs"
mkdir -p "$LOGS"
trap 'tar -C "$W" -czf "$RESULTS/logs.tgz" logs 2>/dev/null; cp "$LOGS/summary.txt" "$RESULTS/summary.txt" 2>/dev/null' EXIT
PY=${PY:-python3}
SUMMARY="$LOGS/summary.txt"
: > "$SUMMARY"

now() { echo $(( $(date +%s) - START )); }
left() { echo $(( DEADLINE - $(date +%s) )); }
log() { echo "[$(now)s] $*" | tee -a "$SUMMARY"; }
# budget WANT [RESERVE]: seconds a stage may take: WANT, or what is left minus RESERVE.
budget() { local want=$1 reserve=${2:-10} l; l=$(( $(left) - reserve )); (( l < want )) && want=$l; (( want < 5 )) && want=5; echo "$want"; }
have_time() { (( $(left) > $1 )); }
tally() { grep -E '(passed|failed|error)' "$1" | tail -1; }

# The timing stages must not pay the poisoning fills; tests/conftest.py turns them on for tests.
unset TRITON_INTERPRET STOCHNORM_EXT_BACKEND STOCHNORM_EXT_POISON_OUTPUTS
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$W/triton_cache"
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
export PYTHONDONTWRITEBYTECODE=1
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfE --durations=10 --timeout=240)
TRITON_TESTS="tests/test_triton_backend.py tests/test_triton_ops.py tests/test_triton_modules.py tests/test_triton_packaging.py"

# ------------------------------------------------------------------ 0 env
{
  echo "date: $(date -u)  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) dirty files: $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit --format=csv 2>&1
  echo "nproc: $(nproc)"
  for t in nvcc ninja compute-sanitizer ncu; do printf '%-18s %s\n' "$t" "$(command -v $t || echo MISSING)"; done
  nvcc --version 2>&1 | tail -1
  # The extension's C++ must match the libstdc++ the process loads: on one image the build took
  # a newer g++ installed beside the system one while Python loaded the system libstdc++: every C++ error
  # message that formats a number segfaulted (stage 3's raw-op error check).
  echo "CXX=${CXX:-unset} c++=$(command -v c++) g++=$(command -v g++)"; c++ --version 2>&1 | head -1
  "$PY" -c "import torch; print('libstdc++ loaded:', sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l}))"
  "$PY" - <<'EOF_ENV'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "torchvision", "numpy", "hypothesis", "pytest", "xdist", "pytest_timeout"):
    try:
        print(f"{name:14s} {getattr(importlib.import_module(name), '__version__', 'present')}")
    except Exception as exc:
        print(f"{name:14s} MISSING ({type(exc).__name__})")
import torch
p = torch.cuda.get_device_properties(0)
print("torch.version.cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", p.name, "SMs", p.multi_processor_count, f"cc {p.major}.{p.minor}", "GiB", round(p.total_memory / 2**30))
EOF_ENV
} > "$LOGS/env.txt" 2>&1
log "env: $(grep -E '^(python|torch |triton |torchvision|device|torch.version)' "$LOGS/env.txt" | tr '\n' ';')"

# ------------------------------------------------------------------ 1 triton tests (no build needed)
( timeout "$(budget 260 120)" "${PYTEST[@]}" -n 4 $TRITON_TESTS -m "not slow" \
    > "$LOGS/tests_triton.log" 2>&1; echo "rc=$?" >> "$LOGS/tests_triton.log" ) &
PID_TRITON=$!

# ------------------------------------------------------------------ 2 build
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 FORCE_CUDA=1
T0=$(date +%s)
if [ "${SKIP_BUILD:-0}" = 1 ] && ls stochnorm_ext/_C*.so >/dev/null 2>&1; then
  echo "SKIP_BUILD=1: kept $(ls stochnorm_ext/_C*.so)" > "$LOGS/build.log"; RC=0
else
  rm -rf build stochnorm_ext/_C*.so
  NVCC_APPEND_FLAGS="--ptxas-options=-v" timeout "$(budget 200 150)" "$PY" setup.py build_ext --inplace \
      > "$LOGS/build.log" 2>&1
  RC=$?
fi
grep -E "Used [0-9]+ registers|spill" "$LOGS/build.log" | sort | uniq -c | sort -rn | head -40 > "$LOGS/ptxas.txt"
grep -iE "warning|error" "$LOGS/build.log" | grep -v "ptxas info" | head -30 > "$LOGS/build_warnings.txt"
log "build rc=$RC in $(( $(date +%s) - T0 ))s: $(ls stochnorm_ext/_C*.so 2>/dev/null); spills: $(grep -c '[1-9][0-9]* bytes spill' "$LOGS/build.log")"

# ------------------------------------------------------------------ 3 smoke
CUDA_LAUNCH_BLOCKING=1 STOCHNORM_EXT_POISON_OUTPUTS=1 timeout 120 "$PY" - > "$LOGS/smoke.log" 2>&1 <<'EOF_SMOKE'
import torch, torch.nn.functional as F, stochnorm_ext as sx
print("backends", sx.backends())
x = torch.randn(4, 8, 5, 5, device="cuda")
ref = F.batch_norm(x, None, None, training=True)
for be in ("cuda", "triton"):
    if sx.backends()[be] is not None:
        print(be, "UNAVAILABLE", sx.backends()[be]); continue
    for fmt in (torch.contiguous_format, torch.channels_last):
        for m in (sx.StochNorm2d(8, p=1.0, backend=be), sx.BatchGroupNorm2d(8, num_groups=8, backend=be)):
            xi = x.detach().contiguous(memory_format=fmt).requires_grad_()
            y = m.cuda()(xi); y.sum().backward(); torch.cuda.synchronize()
            print(be, type(m).__name__, fmt, "max|y - F.batch_norm|", f"{(y - ref).abs().max().item():.2e}",
                  "finite grad", bool(xi.grad.isfinite().all()))
EOF_SMOKE
log "smoke rc=$?: $(grep -E '^(cuda|triton|backends)' "$LOGS/smoke.log" | tr '\n' ';' | cut -c1-600)"

# A C++ op's own error (a message with a number in it) must raise, not crash the process.
timeout 60 "$PY" - > "$LOGS/raw_op_error.log" 2>&1 <<'EOF_RAW'
import torch, stochnorm_ext
try:
    torch.ops.stochnorm_ext.stoch_norm_stats(torch.randn(1, 4, 1, 1), torch.zeros(4), torch.ones(4),
                                             torch.ones(4, dtype=torch.bool), 0.1, torch.tensor(0), True)
    print("raw-op error: NOT RAISED")
except RuntimeError as exc:
    print("raw-op error raised:", str(exc)[:80])
EOF_RAW
log "raw-op error rc=$? (139: segfault): $(tail -1 "$LOGS/raw_op_error.log")"

# ------------------------------------------------------------------ 4 suite | sanitizers
REST=${TESTS:-$(ls tests/test_*.py | grep -v -e test_triton_ -e test_setup_scripts | tr '\n' ' ')}
( timeout "$(budget 220 120)" "${PYTEST[@]}" -n 8 $REST -m "not slow" \
    > "$LOGS/tests_rest.log" 2>&1; echo "rc=$?" >> "$LOGS/tests_rest.log" ) &
PID_REST=$!
sanitize() {  # sanitize TOOL SECONDS PYTEST-ARGS...
  local tool=$1 secs=$2; shift 2
  if ! have_time 160; then echo "skipped: no time" > "$LOGS/san_$tool.log"; return; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 STOCHNORM_EXT_POISON_OUTPUTS=1 timeout "$(budget "$secs" 120)" \
      compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 --report-api-errors no \
      --target-processes all "${PYTEST[@]}" "$@" > "$LOGS/san_$tool.log" 2>&1
  echo "rc=$?" >> "$LOGS/san_$tool.log"
}
(
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer missing" > "$LOGS/san_memcheck.log"; exit 0; }
  sanitize memcheck 130 tests/test_cuda_backend.py tests/test_cbn_window_ops.py \
      -k "long_rows_and_splits or (core_ops_match_torch and float32) or launches_per_op or core_ops_empty_batch or (matches_definition and cuda and float32)"
  sanitize racecheck 60 tests/test_cuda_backend.py -k "long_rows_and_splits and float32"
) &
PID_SAN=$!
wait $PID_TRITON
log "tests triton: $(tally "$LOGS/tests_triton.log") $(tail -1 "$LOGS/tests_triton.log")"
wait $PID_REST
log "tests (rest): $(tally "$LOGS/tests_rest.log") $(tail -1 "$LOGS/tests_rest.log")"
grep -E "^(FAILED|ERROR)" "$LOGS/tests_rest.log" "$LOGS/tests_triton.log" | cut -c1-220 | head -40 > "$LOGS/failures.txt"
wait $PID_SAN
for f in "$LOGS"/san_*.log; do
  log "$(basename "$f" .log): $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|skipped|missing' "$f" | tail -1) $(tally "$f") $(tail -1 "$f")"
done

# ------------------------------------------------------------------ 5 timings, alone on the GPU
if have_time 40; then
  PROBE_SECONDS=$(budget 45 60) timeout "$(budget 60 50)" "$PY" scripts/gpu_probe_perf.py "$LOGS/probe_perf.json" \
      > "$LOGS/probe_perf.log" 2>&1
  log "probe_perf rc=$?: $(tail -1 "$LOGS/probe_perf.log")"
fi
if have_time 40; then
  timeout "$(budget 70 5)" "$PY" -m stochnorm_ext.bench --device cuda --small-batch-only --rounds 3 \
      --min-run-time 0.05 --skip-checks --no-progress --markdown "$LOGS/bench_small.md" > "$LOGS/bench_small.log" 2>&1
  log "bench small-batch rc=$?: $(tail -1 "$LOGS/bench_small.log")"
fi
if have_time 30; then
  timeout "$(budget 90 5)" "$PY" -m stochnorm_ext.bench --device cuda --no-small-batch --skip-checks --rounds 3 \
      --min-run-time 0.05 --no-progress --shapes 256x56x56 2048x7x7 --batches 32 --dtypes float32 bfloat16 \
      --backends cuda triton --markdown "$LOGS/bench_large.md" > "$LOGS/bench_large.log" 2>&1
  log "bench large rc=$?: $(tail -1 "$LOGS/bench_large.log")"
fi
log "done in $(now)s"
