#!/usr/bin/env bash
# GPU validation in one go, sized for one call of at most ~9.3 minutes on one H200: the step benchmark,
# the correctness and sync checks on CUDA, then the kernel and loader benchmarks. Each stage has its own time limit,
# so a slow stage costs only its own results. Needs only PyTorch, Triton, timm and psutil (no FFCV,
# DALI, OmegaConf or network). Writes into RESULTS_DIR (default bench-results/gpu) at most 8 files:
# gpu_check.log (everything printed), step.json, checks.json, kernel.json, loader.json, loader.png,
# nvidia-smi.txt. Converted data and other scratch go to WORK_DIR (default RESULTS_DIR/work).
# Usage: bench/gpu_check.sh [RESULTS_DIR [WORK_DIR]]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-results/gpu}"
work="${2:-$out/work}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON=/path/to/python (e.g. .venv/bin/python)." >&2
    exit 1
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU is visible to PyTorch on this machine; nothing to check." >&2
    exit 1
fi
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
log="$out/gpu_check.log"
: > "$log"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, everything into the log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local code=${PIPESTATUS[0]}
    [ "$code" -eq 124 ] && echo "=== $name: stopped at its ${limit}s limit" | tee -a "$log"
    [ "$code" -eq 0 ] || status=1
}
# What is still unmeasured on a GPU comes first: ViT-B/16 step throughput and MFU; then the checks,
# whose step_syncs also times the ViT-S/16 step that augment_imagenet's share is measured against.
stage step 270 "$python" bench.py step --models vit_base --repeats 10 --json "$out/step.json"
stage checks 180 "$python" bench/gpu_check.py --out "$work" \
    --checks step_syncs,augment_imagenet,kernel,compile,staging,loaders,device_crops_imagenet
cp "$work/checks.json" "$out/" 2>/dev/null
stage kernel 45 "$python" bench.py kernel --repeats 10 --json "$out/kernel.json"
stage loader 60 "$python" bench.py loader --data "$work/data/tiny" --backends torchvision,memory --size 32 \
    --scale 0.1 1.0 --batch 512 --workers 8 --batches 30 --json "$out/loader.json" --plot "$out/loader.png"
echo "gpu_check: results in $out (status $status)" | tee -a "$log"
exit $status
