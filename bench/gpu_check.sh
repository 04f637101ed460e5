#!/usr/bin/env bash
# GPU validation in one go (under 8 minutes on one H200): correctness checks on CUDA, then the GPU
# benchmarks, logs and JSON into RESULTS_DIR. Needs only PyTorch, Triton and timm (no FFCV, DALI or
# network). Usage: bench/gpu_check.sh [RESULTS_DIR]   (default: bench-results/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results/gpu}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON=/path/to/python (e.g. .venv/bin/python)." >&2
    exit 1
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU is visible to PyTorch on this machine; nothing to check." >&2
    exit 1
fi
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
"$python" bench/gpu_check.py --out "$out" 2>&1 | tee "$out/checks.log" || status=1
"$python" bench.py kernel --json "$out/kernel.json" 2>&1 | tee "$out/kernel.log" || status=1
"$python" bench.py step --json "$out/step.json" 2>&1 | tee "$out/step.log" || status=1
"$python" bench.py loader --data "$out/data/tiny" --backends torchvision,memory --size 32 --scale 0.1 1.0 \
    --batch 512 --workers 8 --batches 30 --json "$out/loader.json" --plot "$out/loader.png" 2>&1 \
    | tee "$out/loader.log" || status=1
echo "gpu_check: results in $out (status $status)"
exit $status
