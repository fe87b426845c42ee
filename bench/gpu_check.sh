#!/usr/bin/env bash
# GPU check of issue 4 (run on the lent GPU machine from the repository root; at most ~8 minutes).
# Writes $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/pytest_gpu.log, $OUT/gpu_check.log.
# Every part has its own timeout; a failing part does not stop the others.
set -u
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
left() { echo $(( 470 - ($(date +%s) - T0) )); }   # seconds left of a 470 s budget
log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu_check.log"; }
export PYTHONUNBUFFERED=1

log "versions"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" || true
  $PY -c "import triton; print('triton', triton.__version__)" || true; } 2>&1 | tee -a "$OUT/gpu_check.log"

log "install (editable, no network)"
if [ ! -f README.md ]; then echo "# ACF" > README.md; fi   # setup.py reads it; this is a throwaway copy
timeout 120 $PY -m pip install --no-build-isolation --no-deps --no-index -e . >>"$OUT/gpu_check.log" 2>&1 \
  || log "pip install -e . failed (see log)"
$PY -c "import acf.kernels.l2_attention" >>"$OUT/gpu_check.log" 2>&1 && log "acf.kernels imports" \
  || log "acf.kernels.l2_attention does not import"

if ls csrc/*.cpp csrc/*.cu >/dev/null 2>&1 && grep -q "acf._C" setup.py; then
  log "building the C++/CUDA extension acf._C"
  timeout 240 $PY setup.py build_ext --inplace >>"$OUT/gpu_check.log" 2>&1 || log "extension build failed"
else
  log "no C++/CUDA extension sources (csrc/) or setup.py does not build acf._C: skipped"
fi

T=$(( $(left) - 300 )); [ "$T" -gt 200 ] && T=200
if [ "$T" -gt 20 ]; then
  log "pytest -m gpu (timeout ${T}s)"
  timeout "$T" $PY -m pytest -m gpu -q -x -p no:cacheprovider tests/test_l2_attention.py >"$OUT/pytest_gpu.log" 2>&1
  log "pytest exit $? ; $(tail -n 1 "$OUT/pytest_gpu.log")"
  if ls tests/test_*.py >/dev/null 2>&1; then
    T2=$(( $(left) - 260 ))
    if [ "$T2" -gt 20 ]; then
      timeout "$T2" $PY -m pytest -m gpu -q -p no:cacheprovider --ignore=tests/test_l2_attention.py tests >"$OUT/pytest_gpu_other.log" 2>&1
      log "other gpu tests exit $? ; $(tail -n 1 "$OUT/pytest_gpu_other.log")"
    fi
  fi
else
  log "no time left for pytest"
fi

B=$(( $(left) - 20 ))
log "benchmarks (budget ${B}s)"
timeout $(( B + 15 )) $PY bench/gpu_check.py --out "$OUT" --budget-s $(( B - 30 )) 2>&1 | tee -a "$OUT/gpu_check.log" \
  || log "gpu_check.py failed or timed out"
[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
log "done"
