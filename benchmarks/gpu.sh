#!/usr/bin/env bash
# The GPU check, under 6 minutes with start-up:
# 1. benchmarks/gpu.py (stops itself after 200 s): a ~160M-parameter GPT-NeoX built from a config,
#    fitted and scored in float32 and bfloat16; throughput over plain forward+backward and peak GPU memory.
# 2. jobs.scale on the GPU (130 s): Pythia-160M and one block at Llama-3.2-1B widths (vocabulary 128,256),
#    each in bfloat16 and float32; every stage's seconds and peak GPU memory beside the memory model's.
#   bash benchmarks/gpu.sh [--dry-run] [--output DIR]     (--dry-run: tiny models, any device, ~2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible: the numbers below are not GPU numbers"
OUTPUT=outputs/gpu
DEVICE=cuda
MODELS="[pythia-160m,llama-1b-block]"
arguments=("$@")
for index in "${!arguments[@]}"; do
    case "${arguments[$index]}" in
        --dry-run) DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"); MODELS="[tiny-neox]" ;;
        --output) OUTPUT="${arguments[$((index + 1))]}" ;;
    esac
done
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
timeout 200 "$PYTHON" benchmarks/gpu.py "$@" || echo "benchmarks/gpu.py stopped (exit $?)"
# The first run also builds the rehearsal models (about 30 s on the host), the second reuses them.
for run in "bfloat16 80" "float32 50"; do
    read -r dtype seconds <<< "$run"
    timeout "$seconds" "$PYTHON" -m jobs.scale "scale.models=$MODELS" scale.device="$DEVICE" scale.dtype="$dtype" \
        scale.documents=16 scale.sequence=512 scale.batch_size=8 scale.queries=64 output_dir="$OUTPUT/scale" \
        || echo "jobs.scale ($dtype) stopped (exit $?)"
done
