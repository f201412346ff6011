"""Grouping a run's rows: one summary per task, data set, model, setting of the task options, policy,
budget and policy parameters that vary, with the mean of every metric, the KV share and the seconds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..results import dedupe
from ..stats import bootstrap_ci

POLICY_ORDER = ("full", "window", "streaming", "h2o", "keyformer", "co2")
METRIC_ORDER = (
    "rouge1_ref",
    "rouge2_ref",
    "rougeL_ref",
    "rouge1_full",
    "rouge2_full",
    "rougeL_full",
    "agreement",
    "first_divergence",
    "ppl",
    "ppl_pooled",
    "nll",
    "tokens",
)
NOT_GROUPED = frozenset({"budget", "seed"})  # the budget has its own column; seeds are replicates


def norm(value: Any) -> Any:
    """A hashable, comparison-stable form of a JSON value (floats rounded to 12 significant digits)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    if isinstance(value, list | tuple):
        return tuple(norm(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def value_key(value: Any) -> tuple:
    """Sort key for mixed values: None first, then numbers, then anything else by its text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def budget_key(budget: Any) -> tuple:
    """Sort key for budgets: none (full), then ratios, then token counts."""
    if budget is None:
        return (0, 0)
    if isinstance(budget, float):
        return (1, budget)
    if isinstance(budget, int) and not isinstance(budget, bool):
        return (2, budget)
    return (3, str(budget))


def policy_key(policy: str) -> tuple:
    return (POLICY_ORDER.index(policy), "") if policy in POLICY_ORDER else (len(POLICY_ORDER), policy)


def metric_key(metric: str) -> tuple:
    return (METRIC_ORDER.index(metric), "") if metric in METRIC_ORDER else (len(METRIC_ORDER), metric)


def row_budget(row: dict) -> Any:
    budget = row.get("budget", (row.get("params") or {}).get("budget"))
    return norm(budget)


def row_slice(row: dict) -> tuple[str, str, str, str]:
    """(task, dataset, model, policy) of a row."""
    return (str(row["task"]), str(row["dataset"]), str(row.get("model") or "unknown"), str(row["policy"]))


def _varying(found: dict[tuple, list[dict]], ignore: frozenset = frozenset()) -> dict[tuple, tuple[str, ...]]:
    """For each key: the names that take more than one value among its dicts (a missing name counts as null)."""
    varying = {}
    for key, dicts in found.items():
        names = {name for d in dicts for name in d if name not in ignore}
        varying[key] = tuple(sorted(n for n in names if len({norm(d.get(n)) for d in dicts}) > 1))
    return varying


def varying_params(rows: Iterable[dict]) -> dict[tuple[str, str, str, str], tuple[str, ...]]:
    """For each (task, dataset, model, policy): the policy parameters that take more than one value."""
    found: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        found[row_slice(row)].append(row.get("params") or {})
    return _varying(found, NOT_GROUPED)


def varying_options(rows: Iterable[dict]) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """For each (task, dataset, model): the task options that take more than one value; each of their
    values is a setting of its own, with its own full-attention reference."""
    found: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        found[row_slice(row)[:3]].append(row.get("options") or {})
    return _varying(found)


def setting(row: dict, varying: dict[tuple[str, str, str], tuple[str, ...]]) -> dict:
    """The task options of ``row`` that vary within its (task, dataset, model) (see :func:`varying_options`)."""
    options = row.get("options") or {}
    return {name: options.get(name) for name in varying.get(row_slice(row)[:3], ())}


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float)  # bools count as 0/1


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pooled_ppl(rows: Sequence[dict]) -> float | None:
    """exp(token-weighted mean NLL) when every row has ppl = exp(nll) (nll per token) and a token count."""
    total_nll = total_tokens = 0.0
    for row in rows:
        metrics = row.get("metrics") or {}
        ppl, nll, tokens = metrics.get("ppl"), metrics.get("nll"), metrics.get("tokens")
        if not (_numeric(ppl) and _numeric(nll) and _numeric(tokens)) or tokens <= 0 or ppl <= 0:
            return None
        if not math.isclose(math.log(ppl), nll, rel_tol=1e-4, abs_tol=1e-4):
            return None  # nll is not a per-token mean: no pooled value
        total_nll += nll * tokens
        total_tokens += tokens
    return math.exp(total_nll / total_tokens) if total_tokens else None


def _sample_ci(members: Sequence[dict], name: str) -> tuple[float, float] | None:
    """95% bootstrap interval of the mean of ``name`` over samples (a sample's rows, seeds, averaged first)."""
    per_sample: dict[str, list[float]] = defaultdict(list)
    for row in members:
        value = (row.get("metrics") or {}).get(name)
        if _numeric(value):
            per_sample[json.dumps(row.get("sample_id"), default=str)].append(float(value))
    return bootstrap_ci([sum(v) / len(v) for v in per_sample.values()])


def _means(members: Sequence[dict]) -> dict:
    """Metric means (and pooled perplexity), KV share and seconds of one group's rows."""
    names = sorted({name for row in members for name in (row.get("metrics") or {})}, key=metric_key)
    metrics = {}
    for name in names:
        values = [(row.get("metrics") or {}).get(name) for row in members]
        mean = _mean([float(v) for v in values if _numeric(v)])
        if mean is not None:
            metrics[name] = mean
    if "ppl" in metrics:
        pooled = _pooled_ppl(members)
        if pooled is not None:
            metrics["ppl_pooled"] = pooled
            metrics = dict(sorted(metrics.items(), key=lambda item: metric_key(item[0])))
    ci = {name: _sample_ci(members, name) for name in metrics if name != "ppl_pooled"}
    kept = [(r.get("kv_bytes"), r.get("kv_bytes_full"), r.get("kv_bytes_peak", r.get("kv_bytes"))) for r in members]
    kept = [(k, f, p) for k, f, p in kept if _numeric(k) and _numeric(f) and _numeric(p)]
    full_sum = sum(f for _, f, _ in kept)
    seconds = [float(r["seconds"]) for r in members if _numeric(r.get("seconds"))]
    return {
        "n": len(members),
        "metrics": metrics,
        "ci": {name: value for name, value in ci.items() if value is not None},
        "kv_ratio": sum(k for k, _, _ in kept) / full_sum if full_sum else None,
        "kv_peak_ratio": sum(p for _, _, p in kept) / full_sum if full_sum else None,
        "floored": sum(bool(r.get("floored")) for r in members),
        "seconds": _mean(seconds),
    }


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One dict per group of rows sharing task, dataset, model, the varying task options, policy, budget and
    the varying parameters.

    Each dict holds ``task``, ``dataset``, ``model``, ``options`` (only the task options that vary within the
    run for this task, dataset and model), ``policy``, ``budget``, ``params`` (only the policy parameters that
    vary within the run for this task, dataset, model and policy), ``n`` (rows, after repeats are dropped),
    ``metrics`` (metric name -> mean over the rows that have a number for it; for perplexity also
    ``ppl_pooled``, exp of the token-weighted mean NLL, when ``nll`` is per token), ``ci`` (metric name -> its
    mean's 95% percentile-bootstrap interval over samples, :func:`kvkeep.eval.stats.bootstrap_ci`), ``kv_ratio`` (sum of
    ``kv_bytes`` / sum of ``kv_bytes_full``), ``kv_peak_ratio`` (the same of ``kv_bytes_peak``, the most a
    request held: CO2's measurement phase included), ``floored`` (rows whose budget the policy's floor set) and
    ``seconds`` (mean). Sorted by task, dataset, model, options,
    policy (``full`` first), budget and parameters.
    """
    summaries = []
    for (task, dataset, model, policy, budget, _, _), (members, params, options) in _groups(rows).items():
        summaries.append(
            {
                "task": task,
                "dataset": dataset,
                "model": model,
                "options": options,
                "policy": policy,
                "budget": budget,
                "params": params,
                **_means(members),
            }
        )
    summaries.sort(key=_summary_key)
    return summaries


def _groups(rows: Iterable[dict]) -> dict[tuple, tuple[list[dict], dict, dict]]:
    """The rows (repeats dropped) by (task, dataset, model, policy, budget, varying params, varying options):
    each group's rows, and the params and the options it shows."""
    rows, _ = dedupe(rows)
    varying, settings = varying_params(rows), varying_options(rows)
    groups: dict[tuple, tuple[list[dict], dict, dict]] = {}
    for row in rows:
        key = row_slice(row)
        params = row.get("params") or {}
        names = varying.get(key, ())
        options = setting(row, settings)
        group = (
            *key,
            row_budget(row),
            tuple((name, norm(params.get(name))) for name in names),
            tuple((name, norm(value)) for name, value in options.items()),
        )
        if group not in groups:
            groups[group] = ([], {name: params.get(name) for name in names}, options)
        groups[group][0].append(row)
    return groups


def _summary_key(summary: dict) -> tuple:
    """Task, dataset, model, options, policy (``full`` first), budget and parameters."""
    return (
        summary["task"],
        summary["dataset"],
        summary["model"],
        tuple(value_key(norm(v)) for v in summary["options"].values()),
        policy_key(summary["policy"]),
        budget_key(summary["budget"]),
        tuple(value_key(norm(v)) for v in summary["params"].values()),
    )
