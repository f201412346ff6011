"""Run policies x budgets x a parameter grid over a data set, one JSONL row per sample and configuration.

    runner = Runner(RunOptions(data="cnndm", out="runs/cnndm", limit=20))
    rows = runner.run(runner.configs(["full", "h2o"], [0.2, 0.5], [("recent_ratio", [0.25, 0.5])]))

The command line is ``kvkeep sweep`` (:mod:`kvkeep.cli.sweep`).  Full attention runs first for every sample
(the other rows are compared with it).  Each row is appended to ``OUT/results.jsonl`` (flushed and fsynced)
as soon as it is done; running the same configurations again skips the rows already there (see
:func:`kvkeep.eval.results.row_key`), so a killed sweep resumes without duplicates.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from statistics import mean

import transformers
from tqdm import tqdm

from ..hf import check_config
from ..models import load_config, load_model
from ..policies import POLICIES, make_policy
from ..runinfo import run_metadata
from .data import Sample, load_dataset
from .results import RESULTS_FILE, append_row, load_results, row_key
from .tasks import RunContext, get_task

__all__ = [
    "Config",
    "RunOptions",
    "Runner",
    "build_configs",
    "format_table",
    "full_config",
    "mean_metrics",
    "summary_table",
]

Config = tuple[str, dict]  # (policy name, every policy parameter as in Policy.params(), budget included)


@dataclass(frozen=True)
class RunOptions:
    """What a :class:`Runner` evaluates, and where its rows go.

    Args:
        data: a data set name, a JSONL or .txt file, or a Hugging Face data set ``NAME[:CONFIG]``.
        out: the results folder (``out/results.jsonl``).
        task: the task (default: the data set's).
        task_options: option values per task name, e.g. ``{"summarization": {"max_new_tokens": 64}}``; the
            chosen task's are checked and filled with its defaults (see :data:`kvkeep.eval.tasks.TASKS`).
        model, device, dtype: as :func:`kvkeep.models.load_model` takes them.
        limit, doc_field, ref_field, id_field, split: as :func:`kvkeep.eval.data.load_dataset` takes them.
        contexts, depths, per_cell: the samples of a synthetic data set (see :func:`kvkeep.eval.data.load_dataset`).
        seed: random seed for sampling and for the synthetic samples.
        batch_size: samples per generate call (batched tasks).
    """

    data: str
    out: str | Path
    task: str | None = None
    task_options: dict[str, dict] = field(default_factory=dict)
    model: str = "smollm2"
    device: str | None = None
    dtype: str | None = None
    limit: int | None = None
    doc_field: str | None = None
    ref_field: str | None = None
    id_field: str | None = None
    split: str = "test"
    contexts: tuple[int, ...] | None = None
    depths: tuple[float, ...] | None = None
    per_cell: int | None = None
    seed: int = 0
    batch_size: int = 1


def full_config() -> Config:
    """Full attention: no budget, no parameters."""
    return ("full", make_policy("full").params())


def build_configs(policies: list[str], budgets: list, grid: list[tuple[str, list]], defaults: dict) -> list[Config]:
    """``full`` first (no budget, no parameters), then every other policy x budget x the grid of the
    ``--param`` keys it has; ``defaults`` go to the policies that have them. Validated here, before any run."""
    known = {name: {f.name for f in dataclasses.fields(POLICIES[name])} for name in POLICIES}
    others = [p for p in policies if p != "full"]
    for key, _ in grid:
        if not any(key in known[p] for p in others):
            raise ValueError(f"--param {key}: none of the policies {', '.join(others) or '(none)'} has this parameter")
    configs = [full_config()]
    for name in others:
        mine = [(k, values) for k, values in grid if k in known[name]]
        base = {k: v for k, v in defaults.items() if k in known[name]}
        for budget in budgets:
            for combo in product(*(values for _, values in mine)):
                params = make_policy(name, budget, **{**base, **dict(zip([k for k, _ in mine], combo, strict=True))})
                configs.append((name, params.params()))
    unique = {json.dumps(c, sort_keys=True): c for c in configs}
    return list(unique.values())


# -- results ------------------------------------------------------------------------------------------
def mean_metrics(rows: list[dict], names) -> dict[str, float]:
    """Mean of each metric in ``names`` over ``rows``."""
    return {name: mean(row["metrics"][name] for row in rows) for name in names}


def format_table(header: list[str], lines: list[list]) -> str:
    """A plain text table, columns padded to their widest cell."""
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in line] for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


# -- running ------------------------------------------------------------------------------------------
class Runner:
    """Runs configurations of one task on one data set, appending each row to ``OUT/results.jsonl`` and
    reusing the rows already there.  The model is loaded on the first run that is not cached.

    Attributes:
        run_options: what it was built from.
        dataset, task: the loaded data set and the task evaluated.
        options: every option of the task (its defaults filled in), as each row records it.
        out, results: the results folder and its ``results.jsonl``.
        done: the rows already there, by :func:`~kvkeep.eval.results.row_key`.
    """

    def __init__(self, options: RunOptions):
        if options.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {options.batch_size}")
        self.run_options = options
        self.dataset = load_dataset(
            options.data,
            limit=options.limit,
            doc_field=options.doc_field,
            ref_field=options.ref_field,
            id_field=options.id_field,
            split=options.split,
            contexts=options.contexts,
            depths=options.depths,
            per_cell=options.per_cell,
            seed=options.seed,
        )
        self.task = get_task(options.task or self.dataset.task)
        if self.task.needs_refs and not all(s.refs for s in self.dataset.samples):
            raise ValueError(
                f"task {self.task.name!r} needs references but data set {self.dataset.name!r} has none "
                "(see --ref-field, or --task perplexity)"
            )
        self.options = self.task.check_options(options.task_options.get(self.task.name, {}))
        self.out = Path(options.out)
        self.results = self.out / RESULTS_FILE
        self.done = load_results(self.results)
        self._ctx: RunContext | None = None
        self._meta: dict | None = None

    def configs(self, policies: list[str], budgets: list, grid: list[tuple[str, list]]) -> list[Config]:
        return build_configs(policies, budgets, grid, self.task.policy_defaults(self.options))

    def context(self) -> RunContext:
        if self._ctx is None:
            transformers.utils.logging.disable_progress_bar()
            options = self.run_options
            model, tok = load_model(options.model, dtype=options.dtype, device=options.device)
            self._ctx = RunContext(model, tok, self.dataset, self.options, options.seed)
            self._meta = run_metadata(model)
        return self._ctx

    def identity(self, sample_id: str, config: Config) -> dict:
        """The fields of the row of ``sample_id`` under ``config`` that make its identity (:func:`row_key`)."""
        policy, params = config
        return {
            "task": self.task.name,
            "dataset": self.dataset.name,
            "sample_id": sample_id,
            "model": self.run_options.model,
            "policy": policy,
            "params": params,
            "seed": self.run_options.seed,
            "options": self.options,
        }

    def key(self, sample_id: str, config: Config) -> str:
        return row_key(self.identity(sample_id, config))

    def run(self, configs: list[Config], desc: str | None = None, samples: list[Sample] | None = None) -> list[dict]:
        """Rows of every sample (default: the data set's) x configuration (full attention first), computing only
        the missing ones."""
        configs = [full_config()] + [c for c in configs if c[0] != "full"]
        samples = self.dataset.samples if samples is None else samples
        todo = sum(self.key(s.id, c) not in self.done for s in samples for c in configs)
        size = self.run_options.batch_size if self.task.batched else 1
        rows = []
        if todo and self._ctx is None:  # a model kvkeep cannot run is refused before the bar, from its config
            check_config(load_config(self.run_options.model))
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=todo, desc=desc or f"{self.task.name} {self.dataset.name}", unit="run", disable=not todo)
        with bar, self.results.open("a", encoding="utf-8") as f:
            for start in range(0, len(samples), size):
                batch = samples[start : start + size]
                for config in configs:
                    pending = [s for s in batch if self.key(s.id, config) not in self.done]
                    if pending:
                        bar.set_postfix_str(f"{config[0]} {config[1].get('budget') or ''}".strip())
                        parts = self.task.run(self.context(), pending, *config)
                        for sample, part in zip(pending, parts, strict=True):
                            row = self._row(sample.id, config, part, len(pending))
                            append_row(f, row)
                            self.done[self.key(sample.id, config)] = row
                            bar.update()
                    rows.extend(self.done[self.key(s.id, config)] for s in batch)
        return rows

    def _row(self, sample_id: str, config: Config, part: dict, batch_size: int) -> dict:
        row = {
            **self.identity(sample_id, config),
            "budget": config[1].get("budget"),
            **part,
            "batch_size": batch_size,
            **self._meta,
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        full = row if config[0] == "full" else self.done[self.key(sample_id, full_config())]
        row["metrics"] = {**part["metrics"], **self.task.compare(row, full)}
        return row


def summary_table(rows: list[dict], metrics, shown_params) -> str:
    """Mean metrics and KV kept per configuration, in the order first seen."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row["policy"], row["params"]], sort_keys=True), []).append(row)
    lines = []
    for group in groups.values():
        first = group[0]
        extra = " ".join(f"{k}={first['params'][k]}" for k in shown_params if k in first["params"])
        full = max(1, sum(r["kv_bytes_full"] for r in group))
        kept = sum(r["kv_bytes"] for r in group) / full
        peak = sum(r.get("kv_bytes_peak", r["kv_bytes"]) for r in group) / full
        floored = sum(bool(r.get("floored")) for r in group)
        means = mean_metrics(group, metrics)
        budget = "-" if first["budget"] is None else first["budget"]
        lines.append(
            [first["policy"], budget, extra, len(group), *means.values(), f"{100 * kept:.1f}%", f"{100 * peak:.1f}%",
             floored]
        )  # fmt: skip
    return format_table(["policy", "budget", "params", "n", *metrics, "kv kept", "kv peak", "floored"], lines)
