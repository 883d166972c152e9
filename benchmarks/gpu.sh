#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py): a ~160M-parameter GPT-NeoX built from a config, fitted and
# scored in float32 and bfloat16; throughput over plain forward+backward and peak GPU memory.
# Stops itself after 330 s so that, with start-up, it stays under 6 minutes.
#   bash benchmarks/gpu.sh [--dry-run] [--output DIR]     (--dry-run: a tiny model, any device, ~1 minute)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible: the numbers below are not GPU numbers"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" timeout 330 "$PYTHON" benchmarks/gpu.py "$@"
