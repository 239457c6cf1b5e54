#!/usr/bin/env bash
# One command for a lent GPU machine: the test suite on the GPU, then the benchmark under a time cap.
# Logs and CSVs go to $OUT (default ./gpu_out).  Budget: under 8 minutes in all.
#   bash bench/gpu_check.sh   # env: PYTHON (default python3), OUT, TEST_TIMEOUT (default 120 s), BENCH_CAP (150 s), E2E_CAP (90 s)
# Worst case with the defaults: 120 + (150 + 60) + (90 + 60) = 480 s.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"  # the GPU machines have python3 only
{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

echo "== tests on the GPU (TRITON_INTERPRET unset) =="
timeout "${TEST_TIMEOUT:-120}" "$PYTHON" -m pytest tests/ -x -q -m "not slow" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc" | tee -a "$OUT/pytest.log"

echo "== benchmark (time cap ${BENCH_CAP:-150}s) =="
timeout $(( ${BENCH_CAP:-150} + 60 )) "$PYTHON" bench/conv_fused.py --time-cap "${BENCH_CAP:-150}" \
  --out "$OUT/conv_fused.csv" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench rc=$bench_rc" | tee -a "$OUT/bench.log"
timeout $(( ${E2E_CAP:-90} + 60 )) "$PYTHON" bench/model_e2e.py --time-cap "${E2E_CAP:-90}" --out "$OUT/model_e2e.csv" 2>&1 | tee "$OUT/model_e2e.log"
exit $(( test_rc != 0 || bench_rc != 0 ))
