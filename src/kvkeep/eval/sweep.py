"""``kvkeep sweep``: run policies x budgets x a parameter grid over a data set, one JSONL row per run.

    kvkeep sweep --task summarization --data cnndm --policies full,h2o,keyformer,co2 --budgets 0.2,0.5 \\
        --param tau_end=1,2,3 --limit 20 --out runs/cnndm

Full attention runs first for every sample (the other rows are compared with it).  Each row is appended
to ``OUT/results.jsonl`` (flushed and fsynced) as soon as it is done; running the same command again
skips the rows already there (see :func:`row_key`), so a killed sweep resumes without duplicates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from itertools import product
from pathlib import Path
from statistics import mean

import torch
import transformers
from tqdm import tqdm

from .. import __version__
from ..cli import options as _cli
from ..models import load_model
from ..policies import POLICIES, make_policy
from .data import load_dataset
from .results import KEY_FIELDS, RESULTS_FILE, append_row, load_results, row_key
from .tasks import TASKS, RunContext, get_task

__all__ = [
    "Runner",
    "add_parser",
    "add_run_options",
    "build_configs",
    "full_config",
    "mean_metrics",
    "parse_budgets",
    "parse_grid",
    "parse_policies",
]

DEFAULT_BUDGETS = "0.2,0.3,0.5,0.7,0.9"
Config = tuple[str, dict]  # (policy name, every policy parameter as in Policy.params(), budget included)


def full_config() -> Config:
    """Full attention: no budget, no parameters."""
    return ("full", make_policy("full").params())


# -- parsing --------------------------------------------------------------------------------------------
def _items(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"{what} list {text!r} has an empty item")
    return items


def parse_budgets(text: str) -> list[float | int]:
    """``"0.2,0.5,512"`` -> ``[0.2, 0.5, 512]``; a bad item raises a ``ValueError`` naming it."""
    budgets = []
    for item in _items(text, "budget"):
        try:
            budgets.append(_cli.parse_budget(item))
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--budgets: {err}") from None
    return budgets


def parse_policies(text: str) -> list[str]:
    """``"full,h2o"`` -> ``["full", "h2o"]``, checked against :data:`POLICIES`."""
    names = _items(text, "policy")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(map(repr, unknown))}: choose among {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """``["tau_end=1,2,3", "sinks=4"]`` -> ``[("tau_end", [1, 2, 3]), ("sinks", [4])]`` (values as ``--param``)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        try:
            parsed = [_cli.parse_param(f"{key}={value}") for value in (_items(values, key) if sep else [""])]
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--param: {err}") from None
        grid[parsed[0][0]] = [value for _, value in parsed]
    return list(grid.items())


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
    reusing the rows already there.  The model is loaded on the first run that is not cached."""

    def __init__(self, args: argparse.Namespace):
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        self.args = args
        self.dataset = load_dataset(
            args.data,
            limit=args.limit,
            doc_field=args.doc_field,
            ref_field=args.ref_field,
            id_field=args.id_field,
            split=args.split,
        )
        self.task = get_task(args.task or self.dataset.task)
        if self.task.needs_refs and not all(s.refs for s in self.dataset.samples):
            raise ValueError(
                f"task {self.task.name!r} needs references but data set {self.dataset.name!r} has none "
                "(see --ref-field, or --task perplexity)"
            )
        self.options = self.task.options(args)
        self.out = Path(args.out)
        self.results = self.out / RESULTS_FILE
        self.done = load_results(self.results)
        self._ctx: RunContext | None = None

    def configs(self, policies: list[str], budgets: list, grid: list[tuple[str, list]]) -> list[Config]:
        return build_configs(policies, budgets, grid, self.task.policy_defaults(self.options))

    def context(self) -> RunContext:
        if self._ctx is None:
            transformers.utils.logging.disable_progress_bar()
            model, tok = load_model(self.args.model, dtype=self.args.dtype, device=self.args.device)
            self._ctx = RunContext(model, tok, self.dataset, self.options, self.args.seed)
        return self._ctx

    def key(self, sample_id: str, config: Config) -> str:
        policy, params = config
        fields = (self.task.name, self.dataset.name, sample_id, self.args.model, policy, params, self.args.seed)
        return row_key({**dict(zip(KEY_FIELDS, fields, strict=False)), "options": self.options})

    def run(self, configs: list[Config], desc: str | None = None) -> list[dict]:
        """Rows of every sample x configuration (full attention first), computing only the missing ones."""
        configs = [full_config()] + [c for c in configs if c[0] != "full"]
        samples = self.dataset.samples
        todo = sum(self.key(s.id, c) not in self.done for s in samples for c in configs)
        size = self.args.batch_size if self.task.batched else 1
        rows = []
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
        policy, params = config
        model = self.context().model
        row = {
            "task": self.task.name,
            "dataset": self.dataset.name,
            "sample_id": sample_id,
            "model": self.args.model,
            "policy": policy,
            "params": params,
            "budget": params.get("budget"),
            "seed": self.args.seed,
            "options": self.options,
            **part,
            "batch_size": batch_size,
            "kvkeep_version": __version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        full = row if policy == "full" else self.done[self.key(sample_id, full_config())]
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
        kept = sum(r["kv_bytes"] for r in group) / max(1, sum(r["kv_bytes_full"] for r in group))
        means = mean_metrics(group, metrics)
        budget = "-" if first["budget"] is None else first["budget"]
        lines.append([first["policy"], budget, extra, len(group), *means.values(), f"{100 * kept:.1f}%"])
    return format_table(["policy", "budget", "params", "n", *metrics, "kv kept"], lines)


# -- command line -------------------------------------------------------------------------------------
def add_run_options(parser: argparse.ArgumentParser, policies: str, budgets: bool = False) -> None:
    """Options shared by ``sweep`` and ``budget-search``: data, model, policies (``--budgets`` too when
    ``budgets``), every task's options, output."""
    group = parser.add_argument_group("data")
    group.add_argument("--task", help=f"{', '.join(TASKS)} (default: the data set's)")
    group.add_argument(
        "--data", required=True, help="a data set name, a JSONL or .txt file, or a Hugging Face data set NAME[:CONFIG]"
    )
    group.add_argument("--limit", type=int, help="the first N samples only")
    group.add_argument("--doc-field", help="document field of a JSONL file or hub data set (default: article)")
    group.add_argument("--ref-field", help="reference field(s), comma-separated (default: reference)")
    group.add_argument("--id-field", help="sample id field (default: id, else the record index)")
    group.add_argument("--split", default="test", help="split of a hub data set (default: %(default)s)")
    _cli.add_model_options(parser)
    group = parser.add_argument_group("policies")
    group.add_argument("--policies", default=policies, help="comma-separated (default: %(default)s); full always runs")
    if budgets:
        group.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated ratios or token counts")
    group.add_argument(
        "--param",
        dest="params",
        metavar="KEY=V1,V2",
        action="append",
        default=[],
        help="policy parameter values, a grid over every --param; applies to the policies that have KEY",
    )
    for task in TASKS.values():
        task.arguments(parser.add_argument_group(f"{task.name} task"))
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    group.add_argument(
        "--batch-size", type=int, default=1, help="samples per generate call, summarization (default: %(default)s)"
    )
    group.add_argument("--out", required=True, metavar="DIR", help="results folder, e.g. runs/NAME")


def add_parser(subparsers) -> None:
    """Register ``kvkeep sweep``."""
    parser = subparsers.add_parser(
        "sweep",
        help="evaluate policies x budgets x parameters on a data set",
        description="Run every policy at every budget (and --param grid) on a data set; append one JSON row per "
        "sample and configuration to DIR/results.jsonl, skipping rows already there.",
    )
    add_run_options(parser, policies=",".join(POLICIES), budgets=True)
    parser.set_defaults(func=_sweep)


def _config_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _sweep(args: argparse.Namespace) -> int:
    policies, budgets, grid = parse_policies(args.policies), parse_budgets(args.budgets), parse_grid(args.params)
    runner = Runner(args)
    configs = runner.configs(policies, budgets, grid)
    runner.out.mkdir(parents=True, exist_ok=True)
    (runner.out / "config.json").write_text(json.dumps(_config_dict(args), indent=2) + "\n")
    start = time.perf_counter()
    rows = runner.run(configs)
    print(summary_table(rows, list(runner.task.quality), [k for k, _ in grid]))
    print(f"{len(rows)} rows in {runner.results} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0
