#!/usr/bin/env bash
# The serving benchmark of BENCHMARKS.md on one GPU: Llama-2-7B shape with random weights (bf16), fixed output
# lengths (the end-of-sequence token is ignored), 76 GiB for weights + cache for every method.
# Stages (each one `kvkeep bench-serve` call, well under 10 minutes on an H200):
#   anchorA  transformers' StaticCache + torch.compile on the first 60 requests of workload A
#   A        kvkeep full and every policy at budget 0.5, workload A (96 requests, 2-4k prompts, 256-1024 outputs)
#   A02      budget 0.2, workload A with 300 requests (enough to fill the ~150 rows)
#   anchorM  the anchor on the mixed workload M (64 requests, 512-4k prompts, 64-1024 outputs)
#   M        kvkeep full and keyformer at 0.5 on workload M (96 requests)
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
out=${OUT:-/tmp/serve_bench}; mkdir -p "$out"
common=(bench-serve --arch llama-2-7b --memory-gib 76 --seed 0)
A=(--prompt-tokens 2048-4096 --output-tokens 256-1024)
M=(--prompt-tokens 512-4096 --output-tokens 64-1024)
run() { name=$1; shift; echo "=== $name: kvkeep $*"; python3 -m kvkeep "$@" --json "$out/$name.json" 2>&1 \
          | grep -v "req/s\]" | tee -a "$out/serve_bench.log"; }
for s in "$@"; do
  case $s in
    anchorA) run anchorA "${common[@]}" "${A[@]}" --requests 60 --methods hf-static ;;
    A) run A "${common[@]}" "${A[@]}" --requests 96 --methods full,window,h2o,keyformer,co2 --budgets 0.5 ;;
    A02) run A02 "${common[@]}" "${A[@]}" --requests 300 --methods h2o,keyformer,co2 --budgets 0.2 ;;
    anchorM) run anchorM "${common[@]}" "${M[@]}" --requests 64 --methods hf-static ;;
    M) run M "${common[@]}" "${M[@]}" --requests 96 --methods full,keyformer --budgets 0.5 ;;
  esac
done
