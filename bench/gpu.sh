#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA build of torch (issue 12: "the same bench on the GPU";
# issue 11's terms on CUDA). Ray is not needed: every part runs the stages in one process. Parts 1 and 3 read
# MovieLens-100K: from the cache (CKD_CACHE_DIR, default ~/.cache/continual-kd: copy it over to an offline machine)
# or the network.
#   bash bench/gpu.sh [OUT_DIR]          # logs and JSON land in OUT_DIR (default /tmp/ckd-gpu)
#   CKD_GPU_DEVICE=cpu CKD_GPU_H2H_S=60 bash bench/gpu.sh /tmp/x   # a dry run of the script on the CPU
# Parts, each bounded by its own timeout (a part that runs out keeps the log of what it finished):
#   1. every distillation method of bench/head_to_head.py on the device, with short epochs and one teacher
#      setting: a smoke of every KD term's device path, with each method's training rows/s there;
#   2. bench/scale.py at 1M interactions, chunks of users sized by the GPU's free memory (the default) and,
#      beside it in the same session, by the CPU's 256 MB budget (--gpu-chunks cpu);
#   3. the default job (jobs/stream.yaml, MovieLens-100K) with every model on the device.
set -o pipefail
out=${1:-/tmp/ckd-gpu}
device=${CKD_GPU_DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
threads=$(nproc)
if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
timeout "${CKD_GPU_H2H_S:-150}" python3 bench/head_to_head.py --device "$device" --threads "$threads" \
    --epochs "${CKD_GPU_H2H_EPOCHS:-20}" --patience 5 --teacher-wd 1e-4 --teacher-hard 4 --teacher-lr 0.00025 \
    --student-hard 4 --json "$out/h2h.json" 2>&1 | tee "$out/h2h.log"
for chunks in free cpu; do
    timeout "${CKD_GPU_SCALE_S:-120}" python3 bench/scale.py --sizes "${CKD_GPU_SCALE_SIZES:-1M}" --device "$device" \
        --gpu-chunks "$chunks" --threads "$threads" --stores /tmp/ckd-gpu-stores --json "$out/scale-$chunks.json" \
        2>&1 | tee "$out/scale-$chunks.log"
done
timeout "${CKD_GPU_JOB_S:-150}" python3 bench/continual_vs_retrain.py jobs/stream.yaml --methods job \
    --device "$device" --threads "$threads" --json "$out/job.json" 2>&1 | tee "$out/job.log"
echo "done"
