#!/usr/bin/env bash
# On a CUDA machine (the device tool runs it in the repository root), by stage: tests (the GPU tests), compare
# and engine-compare (a `kvkeep bench` row and `kvkeep bench-serve` before/after; OLD_SRC: the earlier src/
# tree, e.g. from `git archive <commit> src`), tokens (the real model's tokens before/after), engine (a
# serving-engine smoke run), engine-real (the engine on the real model against the compacting path),
# batch-invariance (the real model batched against alone), plain-after (a model's speed outside kvkeep after
# kvkeep ran on it), prefill and co2 (issue 17's prompt cost and CO2's steps, before/after), serve-hybrid
# (issue 18) and profile.  EXTRA_PATH: more import paths (gguf, the SmolLM2 wheel, the server's wheels).
# Logs and JSON go to $OUT (or /tmp/gpu_check).
set -uo pipefail
export PYTHONPATH=$PWD/src${EXTRA_PATH:+:$EXTRA_PATH} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_check}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
stage() { echo "=== $*"; "$@" 2>&1 | tee -a "$out/gpu_check.log"; }
row8=(--arch llama-2-7b --methods full,h2o,keyformer,co2 --budgets 0.5 --prompts 2048 --gens 256 --batches 8)
stages=("$@"); [ $# -eq 0 ] && stages=(tests compare engine)
for s in "${stages[@]}"; do
  case $s in
    tests) stage python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_decode.py tests/test_kernel_prefill.py \
             tests/test_kernel_slots.py tests/test_gpu.py tests/test_static.py tests/test_engine.py tests/test_cache.py \
             tests/test_prompt_scoring.py ;;
    # Issue 18: `kvkeep serve` on a tiny Gemma 3 (needs SmolLM2's tokenizer and the server's wheels on EXTRA_PATH).
    serve-hybrid) stage python3 -m pytest -q -x -p no:cacheprovider tests/test_serve.py -k hybrid ;;
    compare) stage env PYTHONPATH="${OLD_SRC:-.carry/old/src}" python3 -m kvkeep bench "${row8[@]}" \
               --json "$out/bench_before.json"
             stage python3 -m kvkeep bench "${row8[@]}" --json "$out/bench_after.json" ;;
    engine) stage python3 -m kvkeep bench-serve --arch llama-2-7b --methods full,h2o,keyformer,co2 \
              --budgets 0.5 --rows 8 --requests 16 --prompt-tokens 2048 --output-tokens 256 --memory-gib 76 \
              --json "$out/engine_rows8.json" ;;
    # Issue 19 item 13: the real SmolLM2 (KVKEEP_DATA for SummEval): 100 requests batched, then 20 alone on the
    # same engine and 3 on fresh ones, against the compacting path; fails on any request that differs.
    engine-real) stage python3 scripts/engine_check.py --policies co2,h2o,keyformer,window,full --variants graph \
                   --json "$out/engine_check.json" ;;
    # Issue 17: batching changes no greedy token on the GPU: 100 SummEval articles batched (16 rows) against each
    # alone on the engine, real SmolLM2 in fp32, every policy, CUDA graph + Triton.
    batch-invariance) stage python3 scripts/engine_check.py --policies full,window,streaming,h2o,keyformer,co2 \
                        --variants graph --against alone --max-tokens 32 --json "$out/batch_invariance.json" ;;
    # Issue 17 items 1 and 3: a prompt through the cache against a plain SDPA forward, and Keyformer's decode
    # kernel against H2O's, before (OLD_SRC) and after.
    prefill) for tree in before after; do
               src=$PWD/src; [ $tree = before ] && src=${OLD_SRC:-.carry/old/src}
               stage env PYTHONPATH="$src" python3 scripts/prefill_cost.py --json "$out/prefill_$tree.json"
             done ;;
    # Issue 17 item 4: CO2's measurement steps against H2O's steps in `kvkeep bench`, before (OLD_SRC) and after.
    co2) for tree in before after; do
           src=$PWD/src; [ $tree = before ] && src=${OLD_SRC:-.carry/old/src}
           stage env PYTHONPATH="$src" python3 -m kvkeep bench --arch llama-2-7b --methods full,window,h2o,keyformer,co2 \
             --budgets 0.5 --prompts 3072 --gens 32 --batches 1,4 --json "$out/co2_$tree.json"
         done ;;
    # Issue 17 item 5: a plain forward and model.generate before and after kvkeep ran on the model (7B shape).
    plain-after) stage python3 scripts/plain_after.py --arch llama-2-7b --tokens 3000 --repeats 5 \
                   --json "$out/plain_after.json" ;;
    # The serving engine before (OLD_SRC) and after, on one machine: throughput and decode step of each method.
    engine-compare) for tree in before after; do
               src=$PWD/src; [ $tree = before ] && src=${OLD_SRC:-.carry/old/src}
               stage env PYTHONPATH="$src" python3 -m kvkeep bench-serve --arch llama-2-7b --methods h2o,keyformer,co2 \
                 --budgets 0.5 --rows 8 --requests 16 --prompt-tokens 2048 --output-tokens 256 --memory-gib 76 \
                 --json "$out/engine_$tree.json"
             done ;;
    # The real SmolLM2's tokens before (OLD_SRC) and after, generate() and the engine, every policy.
    tokens) stage env PYTHONPATH="${OLD_SRC:-.carry/old/src}${EXTRA_PATH:+:$EXTRA_PATH}" python3 scripts/same_tokens.py --json "$out/tokens_before.json"
            stage python3 scripts/same_tokens.py --json "$out/tokens_after.json" --against "$out/tokens_before.json" ;;
    profile) for p in window keyformer; do stage python3 scripts/profile_decode.py --policy $p; done ;;
  esac
done
