#!/usr/bin/env bash
# One command for a lent GPU machine: the test suite on the GPU, then the benchmark under a time cap.
# Logs and CSVs go to $OUT (default ./gpu_out).  Budget: under 8 minutes in all.
#   bash bench/gpu_check.sh            # env: OUT, BENCH_CAP (seconds, default 240), TEST_TIMEOUT (default 200)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

echo "== tests on the GPU (TRITON_INTERPRET unset) =="
timeout "${TEST_TIMEOUT:-200}" python -m pytest tests/ -x -q -m "not slow" 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc" | tee -a "$OUT/pytest.log"

echo "== benchmark (time cap ${BENCH_CAP:-240}s) =="
timeout $(( ${BENCH_CAP:-240} + 90 )) python bench/conv_fused.py --time-cap "${BENCH_CAP:-240}" \
  --out "$OUT/conv_fused.csv" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench rc=$bench_rc" | tee -a "$OUT/bench.log"
timeout $(( ${E2E_CAP:-120} + 150 )) python bench/model_e2e.py --time-cap "${E2E_CAP:-120}" --out "$OUT/model_e2e.csv" 2>&1 | tee "$OUT/model_e2e.log"
exit $(( test_rc != 0 || bench_rc != 0 ))
