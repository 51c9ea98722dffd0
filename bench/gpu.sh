#!/usr/bin/env bash
# The GPU measurements in one go (issue 12: "the same bench on the GPU"), for a machine with a CUDA build
# of torch: a 0.1M smoke of the CUDA path, the default job's settings on the
# synthetic stream with every model on the GPU, then the scale bench at 1M and 10M interactions.
#   bash bench/gpu.sh [OUT_DIR]          # logs and JSON land in OUT_DIR (default /tmp/ckd-gpu)
# Each part is bounded by its own timeout; the JSON of a finished stream is kept when a later one runs out.
set -o pipefail
out=${1:-/tmp/ckd-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
threads=$(nproc)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" | tee -a "$out/gpu.txt"
timeout "${CKD_GPU_SMOKE_S:-90}" python3 bench/scale.py --sizes 0.1M --device cuda --threads "$threads" \
    --stores /tmp/ckd-gpu-stores --json "$out/scale01.json" 2>&1 | tee "$out/scale01.log"
timeout "${CKD_GPU_JOB_S:-170}" python3 bench/continual_vs_retrain.py jobs/synthetic-stream.yaml --methods job \
    --device cuda --threads "$threads" --json "$out/cvr.json" 2>&1 | tee "$out/cvr.log"
timeout "${CKD_GPU_SCALE_S:-300}" python3 bench/scale.py --sizes 1M,10M --device cuda --threads "$threads" \
    --stores /tmp/ckd-gpu-stores --json "$out/scale.json" 2>&1 | tee "$out/scale.log"
echo "done"
