#!/usr/bin/env bash
# One command for a lent GPU machine that measures everything, under 9 minutes (TOTAL_CAP, default 540 s).
#
#   bash bench/gpu_check.sh              # on the GPU machine; results in $OUT (default ./gpu_out)
#   bash bench/gpu_check.sh --dry-run    # (or DRY_RUN=1) every step on a CPU machine, tiny sizes, short caps
#
# Steps, in this order (the most valuable first: a run cut short keeps what finished, each step writes its own
# files under $OUT as soon as it ends, and each runs under its own `timeout`, never past what is left of
# TOTAL_CAP). Budget with the defaults (cap = when a script starts no new row; limit = its hard timeout):
#   0. preflight (fail fast: no GPU, or the shared data not carried)                               ~5 s
#   1. env: GPU, driver, versions, commit, uncommitted files, data digests -> env.txt               limit 60 s
#   2. conv_fused.py, batch 1: every groups == 1 conv of ResNet-18/50 and MobileNetV2, cuDNN fp16
#      against CoRa chosen / fused / dequant / unfused / fp16w, eager and CUDA graphs               cap CONV1_CAP 75, +45
#   3. conv_fused.py, batch 64 (appended to the same CSV)                                           cap CONV64_CAP 60, +45
#   4. model_e2e.py: whole ResNet-18, ResNet-50, MobileNetV2 (224x224) and the CIFAR ShuffleNetV2 x0.5 (32x32: 37
#      convs on the fused kernel, 19 depthwise on the grouped one) in CUDA graphs, batches 1, 64, 8, 256 in that order,
#      cuDNN fp16 against CoRa chosen and fused-only, tuning budget E2E_TUNE s per model, memory   cap E2E_CAP 120, +60
#   5. the tests on the GPU (not slow; tests/cora/test_cuda.py first), SIGINT at the limit so the summary and
#      the failing names print
#      (pytest-xdist with TEST_WORKERS processes where installed: Triton compiles on 16 cores)      limit TEST_TIMEOUT 110
#   6. the README's `cora quantize cifar_resnet20 --bits 4` with --device cuda, timed              limit QUANT_TIMEOUT 90
#   7. serve_engine.py: the serving engine under CUDA graphs, buckets 1..64 (its cap counts from its
#      start: conversion, warm-ups and both models)                                                cap SERVE_CAP 45, +35
#   8. conv_fused.py, batches 8 and 256 (appended): whatever TOTAL_CAP leaves                      what is left - 20 s
#   9. serve_load.py, the HTTP load test, only where Ray Serve is installed (it is not on the lent machines)
# Why this order: the per-layer and whole-model timings by strategy are what only a GPU can measure and what the
# tuner's decisions are judged by; the tests were run there before (CI runs them on the CPU); quantize and the
# serving engine are single numbers; batches 8 and 256 are interpolation and extreme. After every step the tuning
# table is copied: $OUT/tuning_<GPU>.json (read and rewritten by the benchmarks, seeded from
# bench/results/tuning_<GPU>.json when there is one) and $OUT/tuned_<slug>.json, the same table named as
# cora_kernels.tuning.table_path names it: commit it as cora_kernels/tuned/<slug>.json and the package loads it
# by GPU name. One line per step (name, rc, seconds) goes to env.txt and is printed again at the end, with the
# summaries of the benchmarks and the failing tests. rc 124: stopped at its limit.
#
# Files in $OUT (a lent machine brings back at most 8 files): env.txt (environment + step lines), run.log (every
# step's output), conv_fused.csv, model_e2e.csv, serve_engine.csv, tuning_<GPU>.json, tuned_<slug>.json (and
# serve_load.csv only where Ray Serve is installed). Nothing else is written there.
#
# The shared data must travel with the run: the tests, quantize and serve_engine read the CIFAR-10 arrays and the
# ResNet-20 checkpoint of ../shared, which does not travel to a lent machine. Copy them into an ignored folder of
# the checkout and carry it:
#     mkdir -p .git/info .gpu/shared && grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
#     cp -r ../shared/data ../shared/models .gpu/shared/      # ~45 MB; carry [".gpu"]
# This script takes $CORA_SHARED, else ../shared, else .gpu/shared, and stops at once (rc 3) when none holds the
# files, instead of spending the run (ALLOW_NO_DATA=1: go on and skip the steps that need them).
#
# Environment: PYTHON (python3), OUT, TOTAL_CAP (540), CONV1_CAP, CONV64_CAP, E2E_CAP, E2E_TUNE (20),
# TEST_TIMEOUT, TEST_WORKERS (6), QUANT_TIMEOUT, SERVE_CAP, CORA_SHARED, ALLOW_NO_DATA, DRY_RUN.
# The dry run (CPU, Triton interpreter, a few minutes): TOTAL_CAP 420, the benchmarks' --dry-run (tiny shapes,
# batch 1, no graphs), pytest on `tests/cora_kernels -x -k "tuning or dequant"`, quantize and serve_engine on
# the CPU with tiny settings; the same steps, files and summary lines as the real run.
set -u
cd "$(dirname "$0")/.."

DRY="${DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY" = "1" ] || DRY=0

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"  # the GPU machines have python3 only
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset CORA_STRATEGY CORA_AUTOTUNE  # the benchmarks set what they measure themselves
if [ "$DRY" = 1 ]; then
  TOTAL_CAP="${TOTAL_CAP:-420}"
else
  TOTAL_CAP="${TOTAL_CAP:-540}"
  unset TRITON_INTERPRET
fi
ENV_TXT="$OUT/env.txt"
LOG="$OUT/run.log"
TMPD="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
: > "$LOG"
RESULTS=()

left() { echo $(( TOTAL_CAP - SECONDS )); }
say() { echo "$*" | tee -a "$LOG"; }
note() { echo "$*" | tee -a "$LOG" "$ENV_TXT"; }  # a step line: kept in env.txt too

# ----------------------------------------------------------------------------------------------- preflight
shared=""
for cand in "${CORA_SHARED:-}" ../shared .gpu/shared; do
  if [ -n "$cand" ] && [ -f "$cand/data/cifar10_test.npz" ] && [ -f "$cand/data/cifar10_calib.npz" ] \
     && [ -f "$cand/models/resnet20-12fca82f.th" ]; then
    shared="$(cd "$cand" && pwd)"
    break
  fi
done
HAVE_DATA=1
if [ -z "$shared" ]; then
  msg="gpu_check.sh: the shared data is missing (looked in \$CORA_SHARED='${CORA_SHARED:-}', ../shared, .gpu/shared for
data/cifar10_test.npz, data/cifar10_calib.npz, models/resnet20-12fca82f.th). ../shared does not travel to a lent
machine: run  mkdir -p .gpu/shared && cp -r ../shared/data ../shared/models .gpu/shared/  (with /.gpu/ in
.git/info/exclude) and carry [\".gpu\"]."
  if [ "${ALLOW_NO_DATA:-0}" = 1 ]; then
    say "$msg"
    say "ALLOW_NO_DATA=1: going on; the tests, quantize and serve_engine steps are skipped."
    HAVE_DATA=0
  else
    echo "$msg" | tee "$ENV_TXT" >&2
    echo "Stopping now rather than spending the run (ALLOW_NO_DATA=1 goes on without them)." | tee -a "$ENV_TXT" >&2
    exit 3
  fi
else
  export CORA_SHARED="$shared"
fi
if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); on a CPU machine use --dry-run" \
    | tee "$ENV_TXT" >&2
  exit 4
fi

# ------------------------------------------------------------------------------------------------ helpers
if [ "$DRY" = 1 ]; then
  GPU_NAME="cpu dry run"
else
  GPU_NAME="$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo unknown)"
fi
GPU_FILE="$(echo "$GPU_NAME" | tr ' /' '__')"
TUNING="$OUT/tuning_${GPU_FILE}.json"
SLUG="$("$PYTHON" -c "import sys; from cora_kernels.tuning import table_path; print(table_path(sys.argv[1]).stem)" \
        "$GPU_NAME" 2>/dev/null || echo "$GPU_FILE")"
TUNED="$OUT/tuned_${SLUG}.json"
if [ -f "bench/results/tuning_${GPU_FILE}.json" ]; then cp "bench/results/tuning_${GPU_FILE}.json" "$TUNING"; fi

copy_tuning() {
  rm -f "$OUT"/*.tmp  # a table write cut short by a timeout
  if [ -f "$TUNING" ]; then cp "$TUNING" "$TUNED"; fi
}

# cap NOMINAL GRACE: the --time-cap of a script whose hard limit is NOMINAL + GRACE, shrunk to what TOTAL_CAP leaves
cap() {
  local c=$1 l
  l=$(( $(left) - $2 - 5 ))
  if [ "$l" -lt "$c" ]; then c=$l; fi
  echo "$c"
}

# step NAME LIMIT MIN_SECONDS CMD...: CMD under `timeout` (SIGTERM to its process group, or $STEP_SIGNAL; with
# STEP_FOREGROUND=1 to CMD alone, so that pytest-xdist's controller, not its workers, takes the SIGINT and prints the
# summary) for LIMIT seconds, cut to what is left of TOTAL_CAP; skipped when fewer than MIN_SECONDS are left.
# Output to run.log and $TMPD/NAME.log.
step() {
  local name=$1 limit=$2 min=$3 l t0 rc dt
  shift 3
  l=$(left)
  if [ "$l" -lt "$limit" ]; then limit=$l; fi
  if [ "$limit" -lt "$min" ]; then
    printf 'step %-16s skipped: %ss of TOTAL_CAP left, needs %ss\n' "$name" "$l" "$min" | tee -a "$ENV_TXT" "$LOG"
    RESULTS+=("$name=skipped")
    return 0
  fi
  say ""
  say "== $name (limit ${limit}s, ${l}s of TOTAL_CAP left): $*"
  t0=$SECONDS
  local fg=()
  if [ "${STEP_FOREGROUND:-0}" = 1 ]; then fg=(--foreground); fi
  timeout ${fg[@]+"${fg[@]}"} -s "${STEP_SIGNAL:-TERM}" -k 20 "$limit" "$@" 2>&1 | tee -a "$LOG" "$TMPD/$name.log"
  rc=${PIPESTATUS[0]}
  dt=$(( SECONDS - t0 ))
  copy_tuning
  printf 'step %-16s rc=%-3s %4ss (limit %ss)%s\n' "$name" "$rc" "$dt" "$limit" \
    "$( [ "$rc" = 124 ] && echo ', stopped at its limit' )" | tee -a "$ENV_TXT" "$LOG"
  RESULTS+=("$name=$rc")
  return 0
}

# --------------------------------------------------------------------------------------------------- 1. env
{
  echo "gpu_check.sh $( [ "$DRY" = 1 ] && echo '--dry-run (CPU, Triton interpreter: nothing below is a GPU measurement)' )"
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  TOTAL_CAP: ${TOTAL_CAP}s"
  echo "uncommitted files: $(git status --short 2>/dev/null | wc -l | tr -d ' ')"
  git status --short 2>/dev/null | head -30 | sed 's/^/  /'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: not available"
  echo "host: $(nproc) cores, $(uname -srm)"
} > "$ENV_TXT" 2>&1
timeout 60 "$PYTHON" - "$shared" >> "$ENV_TXT" 2>&1 <<'EOF'
import hashlib, importlib.util, os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
print("pytest-xdist:", "yes" if importlib.util.find_spec("xdist") else "no",
      " torchvision:", "yes" if importlib.util.find_spec("torchvision") else "no",
      " ray.serve:", "yes" if importlib.util.find_spec("ray") else "no")
shared = sys.argv[1]
print("shared data:", shared or "none")
for rel in ("data/cifar10_test.npz", "data/cifar10_calib.npz", "models/resnet20-12fca82f.th"):
    path = os.path.join(shared, rel)
    if shared and os.path.isfile(path):
        print(f"  {rel} sha256 {hashlib.sha256(open(path, 'rb').read()).hexdigest()[:16]}")
EOF
echo "tuning table: $TUNING -> $TUNED (cora_kernels/tuned/${SLUG}.json)" >> "$ENV_TXT"
cat "$ENV_TXT" | tee -a "$LOG"
printf 'step %-16s rc=%-3s %4ss\n' env 0 "$SECONDS" | tee -a "$ENV_TXT" "$LOG"

# ---------------------------------------------------------------------------------------------- benchmarks
if [ "$DRY" = 1 ]; then
  CF_DRY=(--dry-run --batches 1) E2E_DRY=(--dry-run) E2E_B=() TUNE=5
  C1=${CONV1_CAP:-30} C64=${CONV64_CAP:-20} CE=${E2E_CAP:-150} GRACE_C=60 GRACE_E=120
else
  CF_DRY=() E2E_DRY=() E2E_B=(--batches 1 64 8 256 --graph-rep-ms 50) TUNE=${E2E_TUNE:-20}
  C1=${CONV1_CAP:-75} C64=${CONV64_CAP:-60} CE=${E2E_CAP:-120} GRACE_C=45 GRACE_E=60
fi
CF=(bench/conv_fused.py --models resnet18 resnet50 mobilenet_v2 --bits 4 --rep-ms 20 --graph-rep-ms 50
    --tuning "$TUNING" --out "$OUT/conv_fused.csv")

c=$(cap "$C1" "$GRACE_C")
step conv_fused_b1 $(( c + GRACE_C )) 40 "$PYTHON" "${CF[@]}" --batches 1 --time-cap "$c" ${CF_DRY[@]+"${CF_DRY[@]}"}
c=$(cap "$C64" "$GRACE_C")
if [ "$DRY" = 1 ]; then b64=(); else b64=(--batches 64); fi
step conv_fused_b64 $(( c + GRACE_C )) 40 "$PYTHON" "${CF[@]}" --append --time-cap "$c" ${b64[@]+"${b64[@]}"} ${CF_DRY[@]+"${CF_DRY[@]}"}
c=$(cap "$CE" "$GRACE_E")
step model_e2e $(( c + GRACE_E )) 60 "$PYTHON" bench/model_e2e.py --bits 4 --tune-seconds "$TUNE" --time-cap "$c" ${E2E_B[@]+"${E2E_B[@]}"} \
  --tuning "$TUNING" --out "$OUT/model_e2e.csv" ${E2E_DRY[@]+"${E2E_DRY[@]}"}

# ---------------------------------------------------------------------------------------------------- tests
if [ "$HAVE_DATA" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    PYTEST=(tests/cora_kernels -x -q -k "tuning or dequant")
    tlimit=${TEST_TIMEOUT:-150}
  else
    # the CUDA-only tests first, then the kernels', then the rest (pytest collects each file once)
    PYTEST=(tests/cora_kernels tests -q -m "not slow and not heavy" --durations=15)
    if [ -f tests/cora/test_cuda.py ]; then PYTEST=(tests/cora/test_cuda.py "${PYTEST[@]}"); fi
    tlimit=${TEST_TIMEOUT:-110}
    if [ "${TEST_WORKERS:-6}" -gt 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
      PYTEST+=(-n "${TEST_WORKERS:-6}")
    fi
  fi
  # SIGINT at the limit: pytest stops and still prints the failures so far
  STEP_SIGNAL=INT STEP_FOREGROUND=1 step tests "$tlimit" 30 "$PYTHON" -m pytest "${PYTEST[@]}" -p no:cacheprovider -rfE
else
  note "step tests            skipped: no shared data"
fi

# ------------------------------------------------------------------------------------------------- quantize
if [ "$HAVE_DATA" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    QUANT=(--device cpu --calib 100 --iters 5 --tune-iters 5 --eval-limit 200 --no-rtn)
    qlimit=${QUANT_TIMEOUT:-150}  # ~10 s alone; a busy 2-core machine took 83 s once
  else
    QUANT=(--device cuda --eval-limit 2000)
    qlimit=${QUANT_TIMEOUT:-90}
  fi
  TIMEV=()
  if [ -x /usr/bin/time ]; then TIMEV=(/usr/bin/time -v); fi
  step quantize "$qlimit" 30 ${TIMEV[@]+"${TIMEV[@]}"} "$PYTHON" -m cora quantize cifar_resnet20 --bits 4 "${QUANT[@]}" --json
else
  note "step quantize         skipped: no shared data"
fi

# ------------------------------------------------------------------------------------------- serving engine
if [ "$HAVE_DATA" = 1 ]; then
  if [ "$DRY" = 1 ]; then
    SERVE=(--device cpu --max-batch 2 --min-time 0.05 --min-calls 2 --eval-images 50)
    sc=${SERVE_CAP:-20}
  else
    SERVE=(--max-batch 64 --min-time 0.5)
    sc=${SERVE_CAP:-45}
  fi
  # the cap stops new buckets; +35 s: the checkpoint conversion, the last warm-up and bucket
  step serve_engine $(( sc + 35 )) 40 "$PYTHON" bench/serve_engine.py --time-cap "$sc" "${SERVE[@]}" \
    --out "$OUT/serve_engine.csv"
else
  note "step serve_engine     skipped: no shared data"
fi

# ------------------------------------------------------------------------------------ the remaining batches
if [ "$DRY" = 1 ]; then rest=(); else rest=(--batches 8 256); fi
c=$(( $(left) - 20 - 30 ))
step conv_fused_rest $(( c + 30 )) 60 "$PYTHON" "${CF[@]}" --append --time-cap "$c" ${rest[@]+"${rest[@]}"} ${CF_DRY[@]+"${CF_DRY[@]}"}

# ------------------------------------------------------------------------------- HTTP load test (Ray only)
if "$PYTHON" -c "import ray.serve" 2>/dev/null && [ "$HAVE_DATA" = 1 ]; then
  l=$(( $(left) - 45 ))  # 45 s for the servers' SIGTERM shutdown after the limit
  if [ "$l" -ge 90 ]; then
    dev=cuda; [ "$DRY" = 1 ] && dev=cpu
    step serve_load "$l" 90 "$PYTHON" bench/serve_load.py --device "$dev" --max-batch 32 --clients 32 --time-cap 8 \
      --total-cap $(( l - 60 )) --out "$OUT/serve_load.csv" --server-log "$TMPD/serve_load_server.log"
  else
    note "step serve_load       skipped: $(left)s of TOTAL_CAP left"
  fi
else
  note "step serve_load       skipped: no Ray Serve here (or no shared data)"
fi

# ---------------------------------------------------------------------------------------------------- summary
copy_tuning
{
  echo ""
  echo "================================================================ summary ($(( SECONDS ))s of ${TOTAL_CAP}s)"
  grep '^step ' "$ENV_TXT"
  for s in conv_fused_b1 conv_fused_b64 conv_fused_rest; do
    if [ -f "$TMPD/$s.log" ]; then
      echo "--- $s"
      grep -E '^# (time cap|CSV|worst|every)' "$TMPD/$s.log"
      sed -n '/^summary/,$p' "$TMPD/$s.log"
    fi
  done
  if [ -f "$TMPD/model_e2e.log" ]; then
    echo "--- model_e2e"
    grep -E '^# ' "$TMPD/model_e2e.log" | grep -v '^# {' | tail -12
    sed -n '/^summary/,$p' "$TMPD/model_e2e.log"
  fi
  if [ -f "$TMPD/tests.log" ]; then
    echo "--- tests"
    grep -E '^(FAILED|ERROR) |passed|failed|error|[Ii]nterrupted' "$TMPD/tests.log" | tail -40
  fi
  if [ -f "$TMPD/quantize.log" ]; then
    echo "--- quantize"
    grep -E 'Elapsed \(wall|Maximum resident' "$TMPD/quantize.log"
    grep -E '^\{' "$TMPD/quantize.log" | tail -1 | cut -c1-600
  fi
  if [ -f "$TMPD/serve_engine.log" ]; then
    echo "--- serve_engine"
    sed -n '/^| bucket/,$p' "$TMPD/serve_engine.log" | head -20
  fi
  if [ -f "$TUNING" ]; then
    "$PYTHON" - "$TUNING" <<'EOF'
import collections, json, sys
doc = json.load(open(sys.argv[1]))
n = collections.Counter(e.get("strategy", "fused") for e in doc.get("entries", []))
print(f"--- tuning table {sys.argv[1]}: {sum(n.values())} entries, " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())))
EOF
  fi
  files=$(find "$OUT" -type f | wc -l | tr -d ' ')
  echo "--- $OUT: $files files ($(ls "$OUT" | tr '\n' ' '))"
  if [ "$files" -gt 8 ]; then echo "WARNING: more than 8 files in $OUT: a lent machine brings back only 8"; fi
} 2>&1 | tee -a "$LOG" "$TMPD/summary.txt"
cat "$TMPD/summary.txt" >> "$ENV_TXT"
rm -rf "$TMPD"

fail=0
for r in "${RESULTS[@]}"; do
  case "$r" in *=0|*=skipped) ;; *) fail=1 ;; esac
done
exit $fail
