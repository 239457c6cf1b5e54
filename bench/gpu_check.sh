#!/usr/bin/env bash
# One command for a lent GPU machine: the test suite on the GPU, then the benchmarks under time caps.
# Logs and CSVs go to $OUT (default ./gpu_out).  Budget: under 10 minutes in all.
#   bash bench/gpu_check.sh   # env: PYTHON (default python3), OUT, TEST_TIMEOUT (default 180 s), BENCH_CAP (100 s),
#                             #      E2E_CAP (90 s), SERVE_CAP (45 s), TOTAL_CAP (570 s), CORA_SHARED
# Worst case with the defaults: 180 + (100 + 60) + (90 + 60) = 490 s, then the serving steps get what is left of
# TOTAL_CAP: the engine bench (SERVE_CAP + 45 s at most) and, only where Ray Serve is installed, the HTTP load test.
# The shared CIFAR arrays beside the checkout do not travel to a lent machine: copy them into an ignored folder
# of the checkout, e.g. `mkdir -p .gpu && cp -r ../shared .gpu/` with `/.gpu/` in .git/info/exclude, and carry
# `.gpu`; this script then finds .gpu/shared (or set CORA_SHARED).
# Tuned launch choices: bench/results/tuning_<GPU>.json is read first and the updated file is written to $OUT
# (commit it back), so autotuning compiles each layer shape once per GPU model, not once per run.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"  # the GPU machines have python3 only
if [ -z "${CORA_SHARED:-}" ] && [ ! -d ../shared/data ] && [ -d .gpu/shared/data ]; then
  export CORA_SHARED="$PWD/.gpu/shared"
fi
{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  echo "shared data: ${CORA_SHARED:-../shared}"
} 2>&1 | tee "$OUT/env.txt"
gpu_name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_').replace('/', '_'))" 2>/dev/null)
TUNING="$OUT/tuning_${gpu_name:-unknown}.json"
if [ -f "bench/results/tuning_${gpu_name:-unknown}.json" ]; then cp "bench/results/tuning_${gpu_name}.json" "$TUNING"; fi

echo "== tests on the GPU (TRITON_INTERPRET unset) =="
# SIGINT at the limit: pytest stops and still prints the failures so far and the slowest tests
timeout -s INT -k 20 "${TEST_TIMEOUT:-180}" "$PYTHON" -m pytest tests/ -q -m "not slow" -p no:cacheprovider \
  -rfE --durations=15 2>&1 | tee "$OUT/pytest.log"
test_rc=${PIPESTATUS[0]}
echo "pytest rc=$test_rc" | tee -a "$OUT/pytest.log"

echo "== benchmark (time cap ${BENCH_CAP:-150}s) =="
timeout $(( ${BENCH_CAP:-100} + 60 )) "$PYTHON" bench/conv_fused.py --time-cap "${BENCH_CAP:-100}" \
  --batches 1 64 --tuning "$TUNING" --profile-host 300 --out "$OUT/conv_fused.csv" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench rc=$bench_rc" | tee -a "$OUT/bench.log"
# ResNet-18 and MobileNetV2 (depthwise convs on the grouped kernel); batch 1 and 64
timeout $(( ${E2E_CAP:-90} + 60 )) "$PYTHON" bench/model_e2e.py --time-cap "${E2E_CAP:-90}" --models resnet18 mobilenet_v2 \
  --batches 1 64 --bits 4 --tuning "$TUNING" --out "$OUT/model_e2e.csv" 2>&1 | tee -a "$OUT/bench.log"  # one log: at most 8 files come back

# serving: what is left of TOTAL_CAP ($SECONDS counts from the script's start)
left() { echo $(( ${TOTAL_CAP:-570} - SECONDS )); }
serve_rc=0
cap=$(( ${SERVE_CAP:-45} + 45 ))
if [ "$(left)" -lt "$cap" ]; then cap=$(left); fi
if [ "$cap" -ge 60 ]; then
  echo "== serving engine, CUDA graphs (time cap ${SERVE_CAP:-45}s, limit ${cap}s) =="
  # the cap stops new buckets; +45 s: the checkpoint conversion, the last warm-up and bucket
  timeout "$cap" "$PYTHON" bench/serve_engine.py --time-cap "${SERVE_CAP:-45}" --max-batch 64 --min-time 0.5 \
    --out "$OUT/serve_engine_gpu.csv" 2>&1 | tee "$OUT/serve_engine.log"
  serve_rc=${PIPESTATUS[0]}
  echo "serve_engine rc=$serve_rc" | tee -a "$OUT/serve_engine.log"
else
  echo "== serving engine skipped: only $(left)s of TOTAL_CAP left =="
fi
if "$PYTHON" -c "import ray.serve" 2>/dev/null; then
  cap=$(( $(left) - 45 ))  # 45 s for the servers' SIGTERM shutdown after the limit
  if [ "$cap" -ge 90 ]; then
    echo "== HTTP load test, cora serve on Ray Serve (limit ${cap}s) =="
    # one max-batch, both models; no new server after the total cap; SIGTERM at the limit still stops the servers
    timeout -k 45 "$cap" "$PYTHON" bench/serve_load.py --device cuda --max-batch 32 --clients 32 --time-cap 8 \
      --total-cap $(( cap - 60 )) --out "$OUT/serve_load.csv" --server-log "$OUT/serve_load_server.log" \
      2>&1 | tee "$OUT/serve_load.log"
  else
    echo "== HTTP load test skipped: only $(left)s of TOTAL_CAP left =="
  fi
else
  echo "== HTTP load test skipped: no Ray Serve here (python3 -c 'import ray.serve' fails) =="
fi
exit $(( test_rc != 0 || bench_rc != 0 || serve_rc != 0 ))
