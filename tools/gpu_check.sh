#!/usr/bin/env bash
# GPU check: the test suite, then both benchmarks on CUDA: the runtime benchmark (python -m iconv.bench,
# chapter "Runtime") and the training throughput (python -m iconv.bench --training: ConvFlow against the
# Glow baseline at equal parameter count, steps/s and peak memory).
#
#   bash tools/gpu_check.sh          # full: the paper's sweep (c up to 1024 at 8x8, m up to 128 at c=64)
#   bash tools/gpu_check.sh small    # the chapter's reduced sweep only
#
# Made for a bare machine with a GPU (e.g. the `device` tool): needs the repository and pip.
# Writes everything under $OUT (default ./gpu_check_out): gpu_check.log, env.txt, pytest.log,
# runtime_gpu.csv/.json (float32 sweep), runtime_gpu_dense_f64.csv/.json (c=16, 16x16, float64,
# against the dense route), training_gpu.csv/.json (training throughput, Fashion-MNIST shape, batch 64),
# bench.log. Every step has a timeout; the whole check stays under 5 minutes.
# Exit status: 0 all good; 1 tests failed; 2 bad usage; 3 no CUDA; 4 benchmark failed.
# To show the GPU numbers in the book: cp "$OUT/runtime_gpu.csv" book/data/runtime_gpu.csv
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE="${1:-full}"
case "$MODE" in
  small) SWEEP=ci; REPEATS=10; BENCH_TIMEOUT=60; TRAIN_TIMEOUT=40 ;;
  full) SWEEP=paper; REPEATS=20; BENCH_TIMEOUT=100; TRAIN_TIMEOUT=50 ;;
  *) echo "usage: bash tools/gpu_check.sh [small|full]" >&2; exit 2 ;;
esac
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # iconv importable even if the install fails
export PYTHONUNBUFFERED=1
START=$(date +%s)
DEADLINE=285  # seconds for the whole check
# seconds a step may take: its own limit, cut so that RESERVE seconds stay for the later steps
allow() { local limit=$1 reserve=$2 left; left=$(( DEADLINE - ($(date +%s) - START) - reserve ));
          [ "$left" -lt "$limit" ] && limit=$left; [ "$limit" -lt 5 ] && limit=5; echo "$limit"; }
log "mode $MODE, output in $OUT_DIR"

# 1. torch (a GPU machine may come without it) and this package (GPU_CHECK_SKIP_INSTALL=1 skips pip).
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
  log "GPU_CHECK_SKIP_INSTALL=1: using the installed packages"
elif ! python -c "import torch" 2>/dev/null; then
  log "torch is not installed: pip install torch==2.13.0"
  timeout "$(allow 120 150)" python -m pip install -q torch==2.13.0 >>"$LOG" 2>&1 || log "pip install torch failed (see log)"
fi
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ] && \
   ! timeout "$(allow 60 150)" python -m pip install -q -e . hypothesis pytest >>"$LOG" 2>&1; then
  log "pip install -e . failed; retrying without build isolation (PYTHONPATH covers iconv anyway)"
  timeout "$(allow 30 150)" python -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 || true
fi
if ! python -c "import torch" 2>/dev/null; then
  log "TORCH IS NOT AVAILABLE (pip could not install torch==2.13.0): nothing can run."
  exit 3
fi
python - >"$OUT_DIR/env.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "| built for CUDA", torch.version.cuda)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| count", torch.cuda.device_count())
PY
cat "$OUT_DIR/env.txt" | tee -a "$LOG"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "CUDA IS NOT AVAILABLE: this torch cannot use a GPU (a CPU-only wheel, or no driver)."
  log "No GPU result is produced. Running the tests on the CPU only."
  timeout "$(allow 150 0)" python -m pytest tests -x -q -p no:cacheprovider >"$OUT_DIR/pytest.log" 2>&1
  tail -3 "$OUT_DIR/pytest.log" | tee -a "$LOG"
  exit 3
fi

# 2. The test suite (CUDA visible; tests that have a CUDA path take it).
log "pytest tests -x -q"
timeout "$(allow 120 $((BENCH_TIMEOUT + TRAIN_TIMEOUT + 30)))" python -m pytest tests -x -q -p no:cacheprovider >"$OUT_DIR/pytest.log" 2>&1
tests_rc=$?
tail -3 "$OUT_DIR/pytest.log" | tee -a "$LOG"
[ $tests_rc -eq 124 ] && log "pytest stopped by its timeout (the whole check is kept under 5 minutes)"
[ $tests_rc -ne 0 ] && log "TESTS FAILED (exit $tests_rc): see pytest.log"

# 3. The benchmark on the GPU. Rows are saved after every point, so a timeout keeps what was measured.
log "python -m iconv.bench --sweep $SWEEP --device cuda (float32)"
timeout "$(allow "$BENCH_TIMEOUT" $((TRAIN_TIMEOUT + 30)))" python -m iconv.bench --sweep "$SWEEP" --device cuda --dtype float32 \
  --repeats "$REPEATS" --warmup 3 --budget 1.0 --quiet \
  --csv "$OUT_DIR/runtime_gpu.csv" --json "$OUT_DIR/runtime_gpu.json" >"$OUT_DIR/bench.log" 2>&1
bench_rc=$?
log "python -m iconv.bench --point 16x16 --device cuda --dtype float64 (against the dense route)"
timeout "$(allow 30 "$TRAIN_TIMEOUT")" python -m iconv.bench --point 16x16 --device cuda --dtype float64 --repeats 10 --warmup 2 --quiet \
  --csv "$OUT_DIR/runtime_gpu_dense_f64.csv" --json "$OUT_DIR/runtime_gpu_dense_f64.json" >>"$OUT_DIR/bench.log" 2>&1
dense_rc=$?
log "python -m iconv.bench --training --device cuda (ConvFlow vs Glow baseline, batch 64)"
timeout "$(allow "$TRAIN_TIMEOUT" 0)" python -m iconv.bench --training --device cuda --repeats "$REPEATS" --warmup 3 \
  --csv "$OUT_DIR/training_gpu.csv" --json "$OUT_DIR/training_gpu.json" >>"$OUT_DIR/bench.log" 2>&1
train_rc=$?
cat "$OUT_DIR/bench.log"
[ $bench_rc -eq 124 ] && log "the sweep hit its timeout: runtime_gpu.csv holds the points measured so far"
log "finished in $(( $(date +%s) - START )) s"

if [ $tests_rc -ne 0 ]; then exit 1; fi
if [ $bench_rc -ne 0 ] || [ $dense_rc -ne 0 ] || [ $train_rc -ne 0 ]; then
  log "BENCHMARK FAILED (exit $bench_rc, $dense_rc, $train_rc)"; exit 4
fi
log "all good: tests passed, GPU sweep in runtime_gpu.csv, training throughput in training_gpu.csv"
