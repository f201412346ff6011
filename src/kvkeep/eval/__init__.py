"""Evaluation harness: data sets, metrics, tasks, sweeps, the budget search, reports and analyses.

    kvkeep sweep --task summarization --data cnndm --budgets 0.2,0.5 --limit 20 --out runs/cnndm
    kvkeep budget-search --data cnndm --policies h2o,keyformer,co2 --target 0.99 --out runs/cnndm

Rows go to ``runs/NAME/results.jsonl`` (:mod:`.results`), one JSON object per sample and configuration;
re-running a command skips the rows already there.  The commands are in :mod:`kvkeep.cli`; everything
here takes plain values.
"""

from .data import DATASETS, Dataset, DatasetSpec, Sample, data_root, load_dataset, read_jsonl
from .metrics import agreement, perplexity, rouge
from .results import append_row, dedupe, load_results, row_key
from .search import bisect_budget, budget_search, meets_target
from .sweep import Runner, RunOptions, build_configs
from .tasks import TASKS, RunContext, Task, get_task

__all__ = [
    "DATASETS",
    "TASKS",
    "Dataset",
    "DatasetSpec",
    "RunContext",
    "RunOptions",
    "Runner",
    "Sample",
    "Task",
    "agreement",
    "append_row",
    "bisect_budget",
    "budget_search",
    "build_configs",
    "data_root",
    "dedupe",
    "get_task",
    "load_dataset",
    "load_results",
    "meets_target",
    "perplexity",
    "read_jsonl",
    "rouge",
    "row_key",
]
