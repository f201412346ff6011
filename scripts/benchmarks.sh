#!/usr/bin/env bash
# The runs behind BENCHMARKS.md, on one GPU (random weights of real architectures, bfloat16).
# Usage: scripts/benchmarks.sh [A|B1|...|B5|C|D ...]   (default: all); JSON and markdown go to ${OUT:-docs/bench}.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation near the memory limit
out=${OUT:-docs/bench}; mkdir -p "$out"
fit=${FIT:-$out}  # where stage D finds the B runs
kvkeep=(python3 -m kvkeep bench)
stages=("$@"); [ $# -eq 0 ] && stages=(A B1 B2 B3 B4 B5 C D)
for stage in "${stages[@]}"; do
  case $stage in
    # A: every method at both budgets, 2k prompt + 256 new tokens, batch 1 and 8 (Llama-2-7B, MHA)
    A) "${kvkeep[@]}" --arch llama-2-7b --prompts 2048 --gens 256 --batches 1,8 \
         --json "$out/A_llama2_2k.json" --markdown "$out/A_llama2_2k.md" ;;
    # B1-B4 (B5: keyformer alone): 4k prompt + 1k new tokens at budget 0.5, batch 1, 8 and the largest that fits in 76 GiB
    # (four runs, so that each fits the GPU machine's 10-minute command limit)
    B1|B2|B3|B4|B5) methods=$(case $stage in B1) echo hf-sdpa ;; B2) echo hf-eager ;; B3) echo full,window,streaming ;;
                           B4) echo h2o,keyformer,co2 ;; B5) echo keyformer ;; esac)
       "${kvkeep[@]}" --arch llama-2-7b --methods "$methods" --budgets 0.5 --prompts 4096 --gens 1024 \
         --batches 1,8,max --memory-gib 76 --json "$out/${stage}_llama2_4k.json" --markdown "$out/${stage}_llama2_4k.md" ;;
    # D: the largest-batch runs of B1-B5 again, side by side in one run (sized from their batch 1 and 8 peaks)
    D) "${kvkeep[@]}" --arch llama-2-7b --methods hf-sdpa,window,h2o,keyformer,co2 --budgets 0.5 --prompts 4096 \
         --gens 1024 --batches max --memory-gib 76 --fit-from "$fit"/B[1-5]_llama2_4k.json \
         --json "$out/D_llama2_4k_max.json" --markdown "$out/D_llama2_4k_max.md" ;;
    # C: a GQA architecture (Llama-3-8B: 32 query / 8 KV heads), 2k prompt + 256 new tokens
    C) "${kvkeep[@]}" --arch llama-3-8b --methods hf-sdpa,full,window,h2o,keyformer,co2 --budgets 0.5 \
         --prompts 2048 --gens 256 --batches 1,8 --json "$out/C_llama3_2k.json" --markdown "$out/C_llama3_2k.md" ;;
  esac
done
