#!/usr/bin/env bash
# The runs behind RESULTS.md, one stage per argument (default: all). Every sweep is resumable: run the
# same stage again after an interruption and it continues where it stopped. A GPU is recommended.
#   scripts/results.sh cnndm xsum books tau recent report
set -euo pipefail
KVKEEP=${KVKEEP:-kvkeep}
RUNS=${RUNS:-runs}
POLICIES=full,window,streaming,h2o,keyformer,co2
# The papers' experiments use the papers' prompt scoring: every prompt query scores, no pooling, no floor.
PAPER="--param observe=0 --param pool=1 --param floor=0"
stage() {
  case "$1" in
    cnndm)  $KVKEEP sweep --data cnndm --policies $POLICIES --budgets 0.2,0.3,0.5,0.7,0.9 --limit 50 \
              --max-new-tokens 96 --batch-size 50 $PAPER --out "$RUNS/cnndm" ;;
    xsum)   $KVKEEP sweep --data xsum --policies $POLICIES --budgets 0.2,0.3,0.5,0.7,0.9 --limit 100 \
              --max-new-tokens 48 --batch-size 100 $PAPER --out "$RUNS/xsum" ;;
    books)  $KVKEEP sweep --task perplexity --data books --policies $POLICIES --budgets 0.1,0.2,0.3,0.4,0.5 \
              --prompt-tokens 1500 --eval-tokens 100 --windows 1 $PAPER --out "$RUNS/books" ;;
    tau)    $KVKEEP sweep --data cnndm --policies keyformer --budgets 0.3,0.5,0.7 --param tau_end=1,2,3 \
              --limit 50 --max-new-tokens 96 --batch-size 50 $PAPER --out "$RUNS/cnndm_tau" ;;
    recent) $KVKEEP sweep --data cnndm --policies h2o,keyformer --budgets 0.5 \
              --param recent_ratio=0.1,0.2,0.3,0.5,0.7 --limit 50 --max-new-tokens 96 --batch-size 50 \
              $PAPER --out "$RUNS/cnndm_recent" ;;
    report) for run in cnndm xsum books cnndm_tau cnndm_recent; do
              [ -f "$RUNS/$run/results.jsonl" ] && $KVKEEP report "$RUNS/$run" > /dev/null; done ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}
for s in "${@:-cnndm xsum books tau recent report}"; do for t in $s; do stage "$t"; done; done
