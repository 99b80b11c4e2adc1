#!/usr/bin/env bash
# Every GPU check for kernels/ in one go, well under 8 minutes on an H100-class GPU:
#   1. tests/kernels with Triton compiled for the GPU (TRITON_INTERPRET=0), SD1.5-shape tests included;
#   2. bench.attention: TFLOP/s of triton vs SDPA vs xformers -> bench/results/attention.{json,png}.
# Without CUDA it prints that and exits 0. Exit code: non-zero if the tests fail or time runs out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET
exec timeout 470 "$PY" -m flashstep.bench.attention --all "$@"
