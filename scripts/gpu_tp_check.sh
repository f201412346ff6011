#!/usr/bin/env bash
# On a CUDA machine (the device tool runs it in the repository root): kvkeep under transformers' own
# multi-device placement, against the same random weights on one device.
#   2+ GPUs: tensor parallelism over 2 ranks (every policy; compacting, static and CUDA-graph paths; 7B and
#            8B shapes in float32), `kvkeep bench --tp 2`, then a device_map split of the layers over 2 GPUs.
#   1 GPU:   the device_map split puts half the layers on the CPU; tensor parallelism is not checked.
# Logs go to $OUT (or /tmp/gpu_tp_check). Exit status 1 if any check fails.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_tp_check}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
status=0
stage() { echo "=== $*"; "$@" 2>&1 | tee -a "$out/gpu_tp_check.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; }
if [ "$gpus" -ge 2 ]; then
  stage torchrun --standalone --nproc-per-node 2 scripts/gpu_tp_check.py tp --arch llama-2-7b
  stage torchrun --standalone --nproc-per-node 2 scripts/gpu_tp_check.py tp --arch llama-3-8b --layers 8
  stage torchrun --standalone --nproc-per-node 2 -m kvkeep bench --tp 2 --arch llama-2-7b \
    --methods hf-sdpa,full,h2o,keyformer --budgets 0.5 --prompts 2048 --gens 64 --batches 1,8 --json "$out/bench_tp2.json"
  stage python3 scripts/gpu_tp_check.py device-map --arch llama-2-7b
  # the 2-GPU table of BENCHMARKS.md: a 70B shape at TP=2, full against budget 0.5 at equal memory
  stage torchrun --standalone --nproc-per-node 2 -m kvkeep bench --tp 2 --arch llama-2-70b \
    --methods full,h2o,keyformer,co2 --budgets 0.5 --prompts 4096 --gens 1024 --batches 8,max --memory-gib 128 \
    --json "$out/bench_tp2_70b.json" --markdown "$out/bench_tp2_70b.md"
else
  echo "=== one GPU: tensor parallelism not checked; device_map splits the layers between the GPU and the CPU"
  stage python3 scripts/gpu_tp_check.py device-map --arch llama-2-7b --layers 4 --prompts 256 177
fi
echo "=== $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
