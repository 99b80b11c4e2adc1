#!/usr/bin/env bash
# The GPU benchmark in one command, under 8 minutes on an H100-class card:
#   1. bench.gpu: SD1.5-size fp16 latency per attention backend (one step vs teacher@25+CFG, batch
#      1/4/16, tiny decoder), then the HTTP load sweep if time allows -> bench/results/gpu*.json/.png
#   2. bench.attention: the attention micro-benchmark (TFLOP/s per backend) -> bench/results/attention.*
# Without CUDA both say so and it exits 0. The kernel tests on the GPU are bench/gpu_attention.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "bench/gpu.sh: no CUDA device here; nothing measured."
  exit 0
}
timeout 400 "$PY" -m bench.gpu --budget-s 330 "$@"
timeout 70 "$PY" -m bench.attention --warmup-ms 10 --rep-ms 40
