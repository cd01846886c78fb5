#!/usr/bin/env bash
# Benchmarks 1-4 on CUDA (TRANSFER_DEVICE=cuda) plus ResNet-50 bf16 channels-last images/s,
# for when a GPU machine is lent. Whole script under 5 minutes; each step is cut off at its
# share of that budget so one slow step cannot eat the rest (the limits add up to more than
# the budget: the last steps get what is left; measured on an H200 in bench/RESULTS.md).
#
#   bash bench/gpu.sh                 # from the repository root
#   PY=/path/to/python OUT=dir bash bench/gpu.sh
#   bash bench/gpu.sh resnet50 latency   # only these steps (each within its usual limit)
#
# Each step's markdown goes to $OUT/<name>.md (default /tmp/transfer-bench-gpu/), a summary of exit
# codes and times to $OUT/summary.txt. Fewer/shorter rounds than on CPU for the throughput
# benchmarks: an idle, dedicated GPU machine is far less noisy than the shared 2-CPU box.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-/tmp/transfer-bench-gpu}
BUDGET_S=${BUDGET_S:-300}
export TRANSFER_DEVICE=${TRANSFER_DEVICE:-cuda}
mkdir -p "$OUT"
: >"$OUT/summary.txt"

{
  echo "== preflight"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  ls /usr/share/datasets/fashion-mnist >/dev/null 2>&1 || echo "WARNING: Fashion-MNIST missing"
} 2>&1 | tee "$OUT/preflight.txt"

started=$SECONDS
step() {  # step NAME LIMIT_S ARGS...: runs `python -m bench.NAME ARGS` within its limit
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - started)))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    echo "$name: skipped (budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$PY" -m "bench.$name" "$@" 2>&1 |
    tee "$OUT/$name.md"
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

wanted() {  # wanted NAME: no step names given, or NAME among them
  ((${#STEPS[@]} == 0)) && return 0
  local name
  for name in "${STEPS[@]}"; do [[ $name == "$1" ]] && return 0; done
  return 1
}
STEPS=("$@")
wanted resnet50 && step resnet50 60
wanted latency && step latency 60
wanted probe_training && step probe_training 60
wanted predict_throughput && step predict_throughput 90 --repeats 2 --round-seconds 0.5
wanted many_heads && step many_heads 90 --repeats 2 --round-seconds 0.5

echo "== total $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
