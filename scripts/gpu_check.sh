#!/usr/bin/env bash
# On a CUDA machine (the device tool runs it in the repository root): the kernel and GPU decode-path
# tests, then profiles of a decode step and a short benchmark. Logs go to $OUT (or /tmp/gpu_check).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
stage() { echo "=== $*"; "$@" 2>&1 | tee -a "$out/gpu_check.log"; }
stages=("$@"); [ $# -eq 0 ] && stages=(tests profile bench)
for s in "${stages[@]}"; do
  case $s in
    tests) stage python3 -m pytest -q -x -s -p no:cacheprovider tests/test_kernel_decode.py tests/test_kernel_prefill.py \
             tests/test_kernel_slots.py tests/test_gpu.py tests/test_static.py ;;
    profile) for p in window keyformer; do stage python3 scripts/profile_decode.py --policy $p; done ;;
    bench) stage python3 -m kvkeep.cli.main bench --methods hf-sdpa,full,window,h2o,keyformer,co2 --budgets 0.5 \
             --prompts 2048 --gens 64 --batches 1,8 --json "$out/bench_smoke.json" ;;
  esac
done
