"""What the markdown and the plots show of one slice of a run (task, data set, model, setting of the task
options): the reference, the budgets, each policy's main series and swept parameters; and how values read."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from .summary import budget_key, metric_key, norm, policy_key, row_slice, setting, value_key, varying_options

DEFAULT_METRICS = {
    "summarization": ("rouge1_ref", "rouge2_ref", "rougeL_ref"),
    "perplexity": ("ppl",),
    "retrieval": ("accuracy",),
}
METRIC_LABELS = {
    "rouge1_ref": "ROUGE-1 vs reference",
    "rouge2_ref": "ROUGE-2 vs reference",
    "rougeL_ref": "ROUGE-L vs reference",
    "rouge1_full": "ROUGE-1 vs full-attention output",
    "rouge2_full": "ROUGE-2 vs full-attention output",
    "rougeL_full": "ROUGE-L vs full-attention output",
    "agreement": "agreement with full attention",
    "first_divergence": "first token that differs from full attention",
    "ppl": "perplexity (mean over samples)",
    "ppl_pooled": "perplexity (pooled over tokens)",
    "nll": "negative log-likelihood",
    "accuracy": "accuracy (share of the answers in the output)",
}
LOWER_IS_BETTER = frozenset({"ppl", "ppl_pooled", "nll", "ppl_vs_full"})
# Metrics for which "99% of full attention" is a meaningful accuracy bar.
BAR_METRICS = re.compile(r"^(rouge\w*|agreement)$")
BAR = 0.99
RECENT_PARAMS = ("recent_ratio", "rho")  # co2's FIFO share plays the role of the recent window
PARAM_LABELS = {
    "tau_end": "final temperature tau_end",
    "tau_init": "initial temperature tau_init",
    "recent_ratio": "recent-window share of the budget (recent_ratio; co2: rho)",
    "rho": "co2 FIFO share rho",
    "sinks": "attention sinks (tokens)",
    "alpha": "co2 EWMA alpha",
    "N": "co2 steps without eviction N",
}


# -- formatting ---------------------------------------------------------------------------------------
def fmt_value(value: float | None, scale: float | None = None) -> str:
    """4 decimals below 10, 2 below 1000, else none; ``scale`` (the largest value of a table) sets the style."""
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    size = abs(value) if scale is None or not math.isfinite(scale) else max(abs(scale), abs(value))
    if size < 10:
        return f"{value:.4f}"
    if size < 1000:
        return f"{value:.2f}"
    return f"{value:.0f}"


def _scale(values: Iterable[float | None]) -> float | None:
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def fmt_budget(budget: Any) -> str:
    if budget is None:
        return "none"
    if isinstance(budget, float):
        return f"{budget:g}"
    if isinstance(budget, int) and not isinstance(budget, bool):
        return f"{budget} tok"
    return str(budget)


def fmt_params(params: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in params.items())


def series_label(policy: str, params: dict) -> str:
    return f"{policy} ({fmt_params(params)})" if params else policy


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def metric_name(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def has_bar(metric: str) -> bool:
    return bool(BAR_METRICS.match(metric))


# -- slices -------------------------------------------------------------------------------------------
class Slice:
    """The groups of one (task, dataset, model, setting of the varying task options): the reference, the
    budgets and the policies' groups."""

    def __init__(self, task: str, dataset: str, model: str, options: dict, groups: list[dict], samples: int) -> None:
        self.task, self.dataset, self.model, self.options, self.samples = task, dataset, model, options, samples
        self.full = [g for g in groups if g["policy"] == "full"]
        self.groups = [g for g in groups if g["policy"] != "full"]
        self.budgets = sorted({g["budget"] for g in self.groups}, key=budget_key)
        self.policies = sorted({g["policy"] for g in self.groups}, key=policy_key)
        self.expected_n = max((g["n"] for g in groups), default=0)

    def reference(self, metric: str) -> float | None:
        """Full attention's mean (over every full row of this slice, whatever their budget field)."""
        values = [(g["metrics"].get(metric), g["n"]) for g in self.full]
        values = [(v, n) for v, n in values if v is not None]
        total = sum(n for _, n in values)
        return sum(v * n for v, n in values) / total if total else None

    def scale(self, metric: str) -> float | None:
        """The largest value of ``metric`` here: one number style for all its tables."""
        return _scale(g["metrics"].get(metric) for g in self.full + self.groups)

    def metrics(self) -> list[str]:
        return sorted({m for g in self.full + self.groups for m in g["metrics"]}, key=metric_key)

    def main_series(self, policy: str) -> list[tuple[dict, list[dict]]]:
        """The parameter settings of ``policy`` that cover the most budgets (its main sweep), with groups."""
        combos: dict[str, tuple[dict, list[dict]]] = {}
        for g in self.groups:
            if g["policy"] == policy:
                key = json.dumps(g["params"], sort_keys=True, default=str)
                combos.setdefault(key, (g["params"], []))[1].append(g)
        if not combos:
            return []
        most = max(len(members) for _, members in combos.values())
        chosen = [c for c in combos.values() if len(c[1]) == most]
        return sorted(chosen, key=lambda c: tuple(value_key(norm(v)) for v in c[0].values()))

    def swept(self) -> list[tuple[str, str]]:
        """(policy, parameter) for every parameter that takes more than one value for a policy here."""
        result = []
        for policy in self.policies:
            names = {n for g in self.groups if g["policy"] == policy for n in g["params"]}
            for name in sorted(names):
                values = {norm(g["params"].get(name)) for g in self.groups if g["policy"] == policy}
                if len(values) > 1:
                    result.append((policy, name))
        return result

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.dataset, self.model)

    @property
    def title(self) -> str:
        setting = f" · {fmt_params(self.options)}" if self.options else ""
        return f"{self.model} · {self.dataset}{setting} · n={self.samples}"


def slices(summary: list[dict], rows: list[dict]) -> list[Slice]:
    """The groups of :func:`~kvkeep.eval.report.summary.summarize` by slice, each with its number of samples."""
    settings = varying_options(rows)
    samples: dict[tuple, set] = defaultdict(set)
    for row in rows:
        key = (*row_slice(row)[:3], json.dumps(setting(row, settings), default=str))
        samples[key].add(json.dumps(row.get("sample_id"), default=str))
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for g in summary:
        by_key[(g["task"], g["dataset"], g["model"], json.dumps(g["options"], default=str))].append(g)
    return [Slice(*key[:3], groups[0]["options"], groups, len(samples[key])) for key, groups in by_key.items()]


def selected_metrics(sl: Slice, requested: Sequence[str] | None) -> list[str]:
    """The ``requested`` metrics this slice has (default: its task's, else all)."""
    present = sl.metrics()
    if requested:
        return [m for m in requested if m in present]
    defaults = DEFAULT_METRICS.get(sl.task)
    if defaults is None:
        return present
    return [m for m in defaults if m in present]


def budget_kinds(budgets: Sequence[Any]) -> list[tuple[str, list]]:
    """Budgets split into ratios and token counts (they cannot share an x axis)."""
    ratios = [b for b in budgets if isinstance(b, float)]
    tokens = [b for b in budgets if isinstance(b, int) and not isinstance(b, bool)]
    return [(kind, bs) for kind, bs in (("ratio", ratios), ("tokens", tokens)) if bs]


def sweep_axes(swept: Sequence[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Plot axes: one per swept parameter; recent_ratio and co2's rho share the ``recent_ratio`` axis."""
    axes: dict[str, list[tuple[str, str]]] = {}
    for policy, param in swept:
        axis = "recent_ratio" if param in RECENT_PARAMS else param
        axes.setdefault(axis, []).append((policy, param))
    return list(axes.items())
