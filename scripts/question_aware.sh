#!/usr/bin/env bash
# The runs behind RESULTS.md's "Keeping what the question needs": H2O, Keyformer and CO2 under three prompt
# scorings, with the baselines: the published one (every prompt query scores: observe=0 pool=1), the
# observation window alone (the last 32 prompt queries, pooled over 31 positions: every_query=false), and
# kvkeep's default blend of the two (observe=32 pool=31 every_query=true); on every synthetic retrieval kind,
# CNN/DM in both prompt orders, XSum, DialogSum (with and without the floor), QMSum and perplexity on the
# books.  One stage per argument (default: all); every sweep is resumable.  A GPU is recommended: on one
# H200 the stages take 1.5-10 minutes per rule each, and they can run at once (each writes its own folder).
#   scripts/question_aware.sh niah niah-multikey cnndm books report
set -euo pipefail
KVKEEP=${KVKEEP:-kvkeep}
RUNS=${RUNS:-runs/qa}
PAPER=(--param observe=0 --param pool=1 --param floor=0)
WINDOW=(--param observe=32 --param pool=31 --param every_query=false --param floor=0)
BLEND=(--param observe=32 --param pool=31 --param every_query=true --param floor=0)
SYNTH=(--context 2k,4k,6k --depths 0.1,0.3,0.5,0.7,0.9 --per-cell 4 --batch-size 20)
both() {  # both() OUT ARGS...: the same sweep under each prompt scoring (RULES: which, default all three)
  local out=$1; shift
  for rule in ${RULES:-BLEND PAPER WINDOW}; do
    local -n params=$rule
    $KVKEEP sweep "$@" "${params[@]}" --out "$RUNS/$out"
  done
}
stage() {
  case "$1" in
    niah|niah-multikey|niah-multivalue|passkey|vt|cwe)
      both "$1" --data "$1" "${SYNTH[@]}" --policies full,window,streaming,h2o,keyformer,co2 --budgets 0.1,0.2,0.5 ;;
    co2n0)  # CO2 without its measurement phase (N=0); its default N=20 is in the niah and niah-multikey runs
      for kind in niah niah-multikey; do
        both "co2n0-$kind" --data "$kind" "${SYNTH[@]}" --policies co2 --budgets 0.1,0.2,0.5 --param N=0
      done ;;
    cnndm|cnndm-after)
      both "$1" --data "$1" --limit 100 --policies full,h2o,keyformer,co2 --budgets 0.2,0.5 --max-new-tokens 96 \
        --batch-size 50 ;;
    xsum)
      both xsum --data xsum --limit 100 --policies full,h2o,keyformer,co2 --budgets 0.5 --max-new-tokens 48 \
        --batch-size 50 ;;
    dialogsum)  # short prompts: the floor matters here
      both dialogsum --data dialogsum --limit 100 --policies full,window,h2o,keyformer,co2 --budgets 0.2,0.5 \
        --max-new-tokens 64 --batch-size 50
      $KVKEEP sweep --data dialogsum --limit 100 --policies full,window,h2o,keyformer,co2 --budgets 0.2,0.5 \
        --max-new-tokens 64 --batch-size 50 --param observe=32 --param pool=31 --param floor=256 \
        --out "$RUNS/dialogsum" ;;
    qmsum)  # the query comes after the (truncated) transcript
      both qmsum --data qmsum --limit 60 --policies full,h2o,keyformer,co2 --budgets 0.2,0.5 --max-new-tokens 96 \
        --max-prompt-tokens 6000 --batch-size 20 ;;
    books)
      both books --task perplexity --data books --policies full,h2o,keyformer,co2 --budgets 0.1,0.2 \
        --prompt-tokens 1500 --eval-tokens 100 --windows 2 ;;
    report) for run in "$RUNS"/*/; do
              [ -f "$run/results.jsonl" ] && $KVKEEP report "$run" > /dev/null; done ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}
for s in "${@:-niah niah-multikey niah-multivalue cnndm cnndm-after books passkey vt cwe co2n0 dialogsum xsum qmsum report}"; do
  for t in $s; do echo "== $(date +%T) $t"; stage "$t"; done
done
echo "== $(date +%T) done"
