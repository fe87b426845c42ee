#!/usr/bin/env bash
# GPU check of the L2 attention kernels and ops, for the lent GPU machine; run from the repository root. At most ~8 minutes
# (budget 450 s of work plus process start-up), Triton compile time included.
# Writes $OUT/gpu_check.json (+ .md, rewritten after every benchmark row), $OUT/pytest_summary.txt,
# $OUT/pytest_shard_*.log, $OUT/warm_*.log, $OUT/gpu_check.log; prints the markdown table.
# Every part has its own timeout; a failing part does not stop the others.
#
# Timeline: install (<= 60 s) -> extension build (<= 90 s, only if csrc/ and setup.py build acf._C)
# -> GPU tests sharded over processes, in parallel with the compilation of the benchmark kernels
# (Triton compiles on the CPU: 16 cores; the shared on-disk cache serves the later timed run)
# (<= 190 s) -> timed benchmarks with the rest (>= 150 s), serial, GPU to themselves.
set -u
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu_check.log"; }
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET
NCPU=$(nproc 2>/dev/null || echo 8)

log "versions"
{ timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  timeout 60 $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" || true
  timeout 30 $PY -c "import triton; print('triton', triton.__version__)" || true; } 2>&1 | tee -a "$OUT/gpu_check.log"

log "make the package importable from the checkout (no pip: the GPU machine has no network)"
# setup.py maps kernels/ to acf.kernels; a link does the same for a plain PYTHONPATH import.
[ -e acf/kernels ] || ln -s ../kernels acf/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 60 $PY -c "import acf.kernels.l2_attention" >>"$OUT/gpu_check.log" 2>&1 && log "acf.kernels imports" \
  || log "acf.kernels.l2_attention does not import"

if ls csrc/*.cpp csrc/*.cu >/dev/null 2>&1 && grep -q "acf._C" setup.py; then
  log "building the C++/CUDA extension acf._C (timeout 90 s)"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} ACF_BUILD_CUDA=${ACF_BUILD_CUDA:-1} MAX_JOBS=$NCPU timeout 90 $PY setup.py build_ext --inplace >>"$OUT/gpu_check.log" 2>&1 || log "extension build failed or timed out"
else
  log "no C++/CUDA extension sources (csrc/) or setup.py does not build acf._C: skipped"
fi

# --- tests and kernel warm-up, in parallel --------------------------------------------------------
T=$(( $(left) - 160 )); [ "$T" -gt 190 ] && T=190
if [ "$T" -gt 30 ]; then
  WARM=4
  SHARDS=$(( NCPU - WARM )); [ "$SHARDS" -lt 2 ] && SHARDS=2; [ "$SHARDS" -gt 12 ] && SHARDS=12
  log "pytest -m gpu in $SHARDS shards + $WARM benchmark warm-up processes (timeout ${T}s)"
  WPIDS=""
  for i in $(seq 0 $(( WARM - 1 ))); do
    timeout "$T" $PY bench/gpu_check.py --warm "$i/$WARM" >"$OUT/warm_$i.log" 2>&1 &
    WPIDS="$WPIDS $!"
  done
  timeout $(( T + 10 )) $PY bench/pytest_shards.py --shards "$SHARDS" --timeout "$T" --out "$OUT" -- -m gpu tests \
    >>"$OUT/gpu_check.log" 2>&1
  log "pytest exit $?"
  cat "$OUT/pytest_summary.txt" 2>/dev/null | tee -a "$OUT/gpu_check.log"
  for p in $WPIDS; do wait "$p" 2>/dev/null; done
  log "warm-up: $(cat "$OUT"/warm_*.log 2>/dev/null | grep -c ': [0-9.]* s$') workloads compiled, $(cat "$OUT"/warm_*.log 2>/dev/null | grep -c FAILED) failed"
else
  log "no time left for pytest"
fi

# --- timed benchmarks -----------------------------------------------------------------------------
OPS_S=0
if [ -f bench/gpu_ops.py ]; then OPS_S=60; fi   # power_iteration / fixed_point rows, run after the attention rows
B=$(( $(left) - 10 - OPS_S ))
if [ "$B" -gt 30 ]; then
  log "benchmarks (budget ${B}s)"
  timeout $(( B + 20 )) $PY bench/gpu_check.py --out "$OUT" --budget-s $(( B - 25 )) >>"$OUT/gpu_check.log" 2>&1 \
    || log "gpu_check.py failed or timed out (partial results kept in gpu_check.json)"
else
  log "no time left for benchmarks"
fi
if [ "$OPS_S" -gt 0 ]; then
  O=$(( $(left) - 5 )); [ "$O" -gt "$OPS_S" ] && O=$OPS_S
  if [ "$O" -gt 15 ]; then
    log "bench/gpu_ops.py (timeout ${O}s)"
    timeout "$O" $PY bench/gpu_ops.py --out "$OUT" --budget-s $(( O - 10 )) >>"$OUT/gpu_check.log" 2>&1 \
      || log "gpu_ops.py failed or timed out"
  fi
fi
[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
log "done"
