#!/usr/bin/env bash
# Every GPU check in one command, under 8 minutes on an H100-class card (stages capped one by one,
# so one stuck or failing stage never costs the others' figures):
#   1. bench.attention: TFLOP/s of triton vs SDPA vs xformers at SD1.5 shapes -> attention.json/.png
#   2. tests/kernels with Triton compiled for the GPU (TRITON_INTERPRET=0), SD1.5-shape tests included
#   3. bench.gpu: SD1.5-size fp16 latency per attention backend (one step vs teacher@25+CFG, batch
#      1/4/16, tiny decoder), then the HTTP load sweep if its budget allows -> gpu*.json/.png
#
#   bash bench/gpu.sh [RESULTS_DIR]      # default bench/results; PYTHON picks the interpreter
# Without CUDA it says so and exits 0. Exit code: the number of stages that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
RESULTS="${1:-bench/results}"
mkdir -p "$RESULTS"
unset TRITON_INTERPRET
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "bench/gpu.sh: no CUDA device here; nothing measured."
  exit 0
}
failed=0
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${secs} s)"
  timeout --kill-after=10 "$secs" "$@"
  local rc=$?
  echo "== $name: rc=$rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
stage attention 80 "$PY" -m flashstep.bench.attention --warmup-ms 10 --rep-ms 40 --out "$RESULTS/attention.json"
stage kernel-tests 100 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider tests/kernels
stage sd15-latency-and-load 300 "$PY" -m flashstep.bench.gpu --budget-s 260 --out-dir "$RESULTS"
exit "$failed"
