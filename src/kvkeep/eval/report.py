"""Tables and plots from a sweep run: ``kvkeep report runs/NAME [--out DIR] [--metric rouge1_ref ...]``.

A sweep writes ``runs/NAME/results.jsonl`` (one JSON object per sample and configuration) and
``runs/NAME/config.json``. This module reads them back:

- :func:`load_rows` reads ``results.jsonl``;
- :func:`summarize` groups the rows by (task, dataset, model, policy, budget, every policy parameter that
  varies within the run for that policy) and averages each metric, the KV share and the seconds;
- :func:`write_report` writes ``report.md`` (markdown tables), ``summary.csv`` (one row per group) and PNG
  plots: each metric against the KV budget per policy, with the full-attention value and the 99%-of-full
  bar (the MLPerf accuracy target, Keyformer Figure 13; perplexity against budget as in CO2 Figure 6), and
  each swept policy parameter (Keyformer's temperature as in its Figure 16, the recent-window ratio as in
  its Figure 12, ...) against the metric.

Rows of one identity (:func:`kvkeep.eval.results.row_key`: configuration, seed, sample and task options;
a resumed sweep appending again) count once: the last one wins. Task options that vary within a run
(``--max-new-tokens 96`` and ``128``) split it into settings, each reported with its own reference. The
policy parameter ``seed`` (Keyformer's noise seed) never splits groups: like the row's ``seed`` it is a
replicate, averaged over.

Matplotlib is imported only to draw the plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data import numbered_jsonl
from .results import RESULTS_FILE, dedupe

CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.csv"

POLICY_ORDER = ("full", "window", "streaming", "h2o", "keyformer", "co2")
DEFAULT_METRICS = {
    "summarization": ("rouge1_ref", "rouge2_ref", "rougeL_ref"),
    "perplexity": ("ppl",),
}
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
}
LOWER_IS_BETTER = frozenset({"ppl", "ppl_pooled", "nll"})
# Metrics for which "99% of full attention" is a meaningful accuracy bar.
BAR_METRICS = re.compile(r"^(rouge\w*|agreement)$")
BAR = 0.99
NOT_GROUPED = frozenset({"budget", "seed"})  # the budget has its own column; seeds are replicates
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
_REQUIRED = ("task", "dataset", "policy")


# -- reading ------------------------------------------------------------------------------------------
def load_rows(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/results.jsonl``, blank lines skipped.

    Raises ValueError when the folder or the file is missing, or a line is not a JSON object with at
    least ``task``, ``dataset`` and ``policy`` (the message names the file and the line number).
    """
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not run_dir.is_dir():
        raise ValueError(f"no run folder {run_dir}")
    if not path.is_file():
        raise ValueError(f"no results in {run_dir}: {RESULTS_FILE} is missing (run 'kvkeep sweep --out {run_dir}')")
    rows = []
    try:
        for number, row in numbered_jsonl(path):
            missing = [key for key in _REQUIRED if row.get(key) is None]
            if missing:
                raise ValueError(f"{path}, line {number}: missing {', '.join(missing)}")
            for key in ("metrics", "params"):
                if row.get(key) is not None and not isinstance(row[key], dict):
                    raise ValueError(f"{path}, line {number}: {key} must be an object")
            rows.append(row)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err.reason}") from None
    return rows


def load_config(run_dir: str | Path) -> dict:
    """``run_dir/config.json`` as a dict, or ``{}`` when it is missing or unreadable."""
    try:
        config = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


# -- grouping -----------------------------------------------------------------------------------------
def _norm(value: Any) -> Any:
    """A hashable, comparison-stable form of a JSON value (floats rounded to 12 significant digits)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    if isinstance(value, list | tuple):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _sortable(value: Any) -> tuple:
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


def _budget(row: dict) -> Any:
    budget = row.get("budget", (row.get("params") or {}).get("budget"))
    return _norm(budget)


def _slice(row: dict) -> tuple[str, str, str, str]:
    """(task, dataset, model, policy) of a row."""
    return (str(row["task"]), str(row["dataset"]), str(row.get("model") or "unknown"), str(row["policy"]))


def _varying(found: dict[tuple, list[dict]], ignore: frozenset = frozenset()) -> dict[tuple, tuple[str, ...]]:
    """For each key: the names that take more than one value among its dicts (a missing name counts as null)."""
    varying = {}
    for key, dicts in found.items():
        names = {name for d in dicts for name in d if name not in ignore}
        varying[key] = tuple(sorted(n for n in names if len({_norm(d.get(n)) for d in dicts}) > 1))
    return varying


def varying_params(rows: Iterable[dict]) -> dict[tuple[str, str, str, str], tuple[str, ...]]:
    """For each (task, dataset, model, policy): the policy parameters that take more than one value."""
    found: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        found[_slice(row)].append(row.get("params") or {})
    return _varying(found, NOT_GROUPED)


def varying_options(rows: Iterable[dict]) -> dict[tuple[str, str, str], tuple[str, ...]]:
    """For each (task, dataset, model): the task options that take more than one value; each of their
    values is a setting of its own, with its own full-attention reference."""
    found: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        found[_slice(row)[:3]].append(row.get("options") or {})
    return _varying(found)


def setting(row: dict, varying: dict[tuple[str, str, str], tuple[str, ...]]) -> dict:
    """The task options of ``row`` that vary within its (task, dataset, model) (see :func:`varying_options`)."""
    options = row.get("options") or {}
    return {name: options.get(name) for name in varying.get(_slice(row)[:3], ())}


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
    kept = [(r.get("kv_bytes"), r.get("kv_bytes_full")) for r in members]
    kept = [(k, f) for k, f in kept if _numeric(k) and _numeric(f)]
    full_sum = sum(f for _, f in kept)
    seconds = [float(r["seconds"]) for r in members if _numeric(r.get("seconds"))]
    return {
        "n": len(members),
        "metrics": metrics,
        "kv_ratio": sum(k for k, _ in kept) / full_sum if full_sum else None,
        "seconds": _mean(seconds),
    }


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One dict per group of rows sharing task, dataset, model, the varying task options, policy, budget and
    the varying parameters.

    Each dict holds ``task``, ``dataset``, ``model``, ``options`` (only the task options that vary within the
    run for this task, dataset and model), ``policy``, ``budget``, ``params`` (only the policy parameters that
    vary within the run for this task, dataset, model and policy), ``n`` (rows, after repeats are dropped),
    ``metrics`` (metric name -> mean over the rows that have a number for it; for perplexity also
    ``ppl_pooled``, exp of the token-weighted mean NLL, when ``nll`` is per token), ``kv_ratio`` (sum of
    ``kv_bytes`` / sum of ``kv_bytes_full``) and ``seconds`` (mean). Sorted by task, dataset, model, options,
    policy (``full`` first), budget and parameters.
    """
    rows, _ = dedupe(rows)
    varying, settings = varying_params(rows), varying_options(rows)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    shown: dict[tuple, tuple[dict, dict]] = {}
    for row in rows:
        key = _slice(row)
        params = row.get("params") or {}
        names = varying.get(key, ())
        options = setting(row, settings)
        group = (
            *key,
            _budget(row),
            tuple((name, _norm(params.get(name))) for name in names),
            tuple((name, _norm(value)) for name, value in options.items()),
        )
        groups[group].append(row)
        shown.setdefault(group, ({name: params.get(name) for name in names}, options))

    summaries = []
    for group, members in groups.items():
        task, dataset, model, policy, budget, _, _ = group
        params, options = shown[group]
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
    summaries.sort(
        key=lambda s: (
            s["task"],
            s["dataset"],
            s["model"],
            tuple(_sortable(_norm(v)) for v in s["options"].values()),
            policy_key(s["policy"]),
            budget_key(s["budget"]),
            tuple(_sortable(_norm(v)) for v in s["params"].values()),
        )
    )
    return summaries


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


def _series_label(policy: str, params: dict) -> str:
    return f"{policy} ({fmt_params(params)})" if params else policy


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def _md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _metric_name(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def _has_bar(metric: str) -> bool:
    return bool(BAR_METRICS.match(metric))


# -- the report ---------------------------------------------------------------------------------------
class _Slice:
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
        return sorted(chosen, key=lambda c: tuple(_sortable(_norm(v)) for v in c[0].values()))

    def swept(self) -> list[tuple[str, str]]:
        """(policy, parameter) for every parameter that takes more than one value for a policy here."""
        result = []
        for policy in self.policies:
            names = {n for g in self.groups if g["policy"] == policy for n in g["params"]}
            for name in sorted(names):
                values = {_norm(g["params"].get(name)) for g in self.groups if g["policy"] == policy}
                if len(values) > 1:
                    result.append((policy, name))
        return result

    @property
    def title(self) -> str:
        setting = f" · {fmt_params(self.options)}" if self.options else ""
        return f"{self.model} · {self.dataset}{setting} · n={self.samples}"


def _cell(group: dict | None, metric: str, sl: _Slice) -> str:
    if group is None or metric not in group["metrics"]:
        return "–"
    value, ref = group["metrics"][metric], sl.reference(metric)
    text = fmt_value(value, sl.scale(metric))
    if ref is not None and _has_bar(metric) and value >= BAR * ref:
        text = f"**{text}**"
    if group["n"] < sl.expected_n:
        text += f" (n={group['n']})"
    return text


def _main_table(sl: _Slice, metric: str) -> list[str]:
    ref = sl.reference(metric)
    header = ["policy", *(fmt_budget(b) for b in sl.budgets)]
    body = []
    if ref is not None:
        body.append(["full (no eviction)", *([fmt_value(ref, sl.scale(metric))] * len(sl.budgets))])
    for policy in sl.policies:
        for params, groups in sl.main_series(policy):
            by_budget = {g["budget"]: g for g in groups}
            row = [_series_label(policy, params)]
            row += [_cell(by_budget.get(b), metric, sl) for b in sl.budgets]
            body.append(row)
    return _md_table(header, body)


def _kv_table(sl: _Slice) -> list[str]:
    header = ["policy", *(fmt_budget(b) for b in sl.budgets)]
    body = []
    for policy in sl.policies:
        for params, groups in sl.main_series(policy):
            by_budget = {g["budget"]: g for g in groups}
            cells = [fmt_value(by_budget[b]["kv_ratio"]) if b in by_budget else "–" for b in sl.budgets]
            body.append([_series_label(policy, params), *cells])
    return _md_table(header, body)


def _sweep_table(sl: _Slice, policy: str, param: str, metric: str) -> list[str]:
    groups = [g for g in sl.groups if g["policy"] == policy]
    budgets = sorted({g["budget"] for g in groups}, key=budget_key)
    rows: dict[str, tuple[tuple, dict]] = {}
    for g in groups:
        others = {k: v for k, v in g["params"].items() if k != param}
        label = f"{param}={g['params'].get(param)}" + (f"; {fmt_params(others)}" if others else "")
        order = (_sortable(_norm(g["params"].get(param))), *(_sortable(_norm(v)) for v in others.values()))
        rows.setdefault(label, (order, {}))[1][g["budget"]] = g
    body = [
        [label, *(_cell(cells.get(b), metric, sl) for b in budgets)]
        for label, (_, cells) in sorted(rows.items(), key=lambda item: item[1][0])
    ]
    return _md_table([param, *(fmt_budget(b) for b in budgets)], body)


def _header(run_dir: Path, rows: list[dict], dropped: int, config: dict) -> list[str]:
    def values(key: str) -> str:
        found = sorted({str(r[key]) for r in rows if r.get(key) is not None})
        return " / ".join(found) if found else "?"

    samples = Counter()
    for task, dataset, _ in {(r["task"], r["dataset"], json.dumps(r.get("sample_id"))) for r in rows}:
        samples[(task, dataset)] += 1
    n_text = ", ".join(f"{n} {dataset} ({task})" for (task, dataset), n in sorted(samples.items()))
    line = (
        f"model: {values('model')} · samples: {n_text} · rows: {len(rows)} · kvkeep {values('kvkeep_version')} · "
        f"transformers {values('transformers_version')} · torch {values('torch_version')} · "
        f"{values('device')} {values('dtype')}"
    )
    lines = [f"# kvkeep report: {run_dir.name or run_dir}", "", line]
    command = config.get("command_line")
    if isinstance(command, list):
        command = shlex.join(str(c) for c in command)
    if command:
        lines += ["", f"command: `{command}`"]
    if dropped:
        repeated = "repeated rows (same configuration, seed, sample and options) counted once, the last kept"
        lines += ["", f"{dropped} {repeated}."]
    return lines


def _selected_metrics(sl: _Slice, requested: Sequence[str] | None) -> list[str]:
    present = sl.metrics()
    if requested:
        return [m for m in requested if m in present]
    defaults = DEFAULT_METRICS.get(sl.task)
    if defaults is None:
        return present
    return [m for m in defaults if m in present]


def _slices(summary: list[dict], rows: list[dict]) -> list[_Slice]:
    settings = varying_options(rows)
    samples: dict[tuple, set] = defaultdict(set)
    for row in rows:
        key = (*_slice(row)[:3], json.dumps(setting(row, settings), default=str))
        samples[key].add(json.dumps(row.get("sample_id"), default=str))
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for g in summary:
        by_key[(g["task"], g["dataset"], g["model"], json.dumps(g["options"], default=str))].append(g)
    return [_Slice(*key[:3], groups[0]["options"], groups, len(samples[key])) for key, groups in by_key.items()]


def write_summary_csv(summary: list[dict], path: Path) -> None:
    """One row per group: keys, ``param_<name>`` for each varying parameter, ``option_<name>`` for each
    varying task option, n, kv_ratio, seconds, metrics."""
    params = sorted({name for g in summary for name in g["params"]})
    options = sorted({name for g in summary for name in g["options"]})
    metrics = sorted({m for g in summary for m in g["metrics"]}, key=metric_key)
    fields = ["task", "dataset", "model", "policy", "budget", *(f"param_{p}" for p in params)]
    fields += [*(f"option_{o}" for o in options), "n", "kv_ratio", "seconds", *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for g in summary:
        row = {k: g[k] for k in ("task", "dataset", "model", "policy", "n")}
        row["budget"] = "" if g["budget"] is None else g["budget"]
        row.update({f"param_{p}": g["params"].get(p, "") for p in params})
        row.update({f"option_{o}": g["options"].get(o, "") for o in options})
        row.update({k: "" if g[k] is None else g[k] for k in ("kv_ratio", "seconds")})
        row.update({m: g["metrics"].get(m, "") for m in metrics})
        writer.writerow(row)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, metrics: Sequence[str] | None = None
) -> tuple[str, list[Path]]:
    """Write ``report.md``, ``summary.csv`` and the plots of a run to ``out_dir`` (default: ``run_dir``).

    ``metrics``: the metrics of the tables and plots (default: ROUGE-1/2/L vs reference for
    summarization, ``ppl`` for perplexity, every metric for other tasks). Returns the markdown and the paths
    written. Raises ValueError for a run without rows or a metric that no row has.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    raw = load_rows(run_dir)
    if not raw:
        raise ValueError(f"no results in {run_dir}: {RESULTS_FILE} has no rows")
    rows, dropped = dedupe(raw)
    summary = summarize(rows)
    slices = _slices(summary, rows)
    available = sorted({m for g in summary for m in g["metrics"]}, key=metric_key)
    for metric in metrics or ():
        if metric not in available:
            raise ValueError(f"no row has the metric {metric!r}; available: {', '.join(available) or 'none'}")

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plotting = False
    else:
        plotting = True
    out_dir.mkdir(parents=True, exist_ok=True)
    many_models = len({sl.model for sl in slices}) > 1
    written: list[Path] = []
    md = _header(run_dir, rows, dropped, load_config(run_dir))
    if not plotting:
        md += ["", "No plots: matplotlib is not installed (pip install 'kvkeep[eval]')."]

    for sl in slices:
        setting = fmt_params(sl.options)
        heading = f"## {sl.task} · {sl.dataset}" + (f" · {sl.model}" if many_models else "")
        md += ["", heading + (f" · {setting}" if setting else ""), ""]
        md.append(f"{sl.samples} samples; policies: {', '.join(sl.policies) or 'none but full'}.")
        prefix = _slug(sl.dataset) + (f"_{_slug(sl.model)}" if many_models else "")
        prefix += f"_{_slug(setting)}" if setting else ""
        chosen = _selected_metrics(sl, metrics)
        if not sl.full:
            md += ["", "No full-attention rows: no reference value, no 99%-of-full bar."]
        if not chosen:
            md += ["", "None of the selected metrics is in these rows."]
            continue
        if not sl.groups:
            for metric in chosen:
                md += ["", f"{_metric_name(metric)} ({metric}), full attention: {fmt_value(sl.reference(metric))}"]
            continue
        for metric in chosen:
            ref = sl.reference(metric)
            md += ["", f"### {_metric_name(metric)} (`{metric}`) by KV budget", ""]
            md += _main_table(sl, metric)
            notes = [f"Mean over samples; columns: KV budget ({_budget_note(sl.budgets)})."]
            if ref is not None and _has_bar(metric):
                bar = fmt_value(BAR * ref, sl.scale(metric))
                notes.append(f"**Bold**: at least 99% of full attention ({bar}, the MLPerf bar).")
            md += ["", " ".join(notes)]
            if plotting:
                for kind, budgets in _budget_kinds(sl.budgets):
                    suffix = "_tokens" if kind == "tokens" and len(_budget_kinds(sl.budgets)) > 1 else ""
                    path = out_dir / f"{prefix}_{_slug(metric)}_vs_budget{suffix}.png"
                    _plot_vs_budget(path, sl, metric, budgets, kind)
                    written.append(path)
                    md += ["", f"![{metric} vs budget]({path.name})"]
        md += ["", "### KV bytes kept / full (measured)", ""]
        md += _kv_table(sl)
        swept = sl.swept()
        for policy, param in swept:
            for metric in chosen:
                md += ["", f"### {policy}: {metric} by `{param}` and budget", ""]
                md += _sweep_table(sl, policy, param, metric)
                ref = sl.reference(metric)
                if ref is not None:
                    md += ["", f"Full attention: {fmt_value(ref, sl.scale(metric))}."]
        if plotting:
            for axis, series_params in _sweep_axes(swept):
                for metric in chosen:
                    path = out_dir / f"{prefix}_{_slug(metric)}_vs_{_slug(axis)}.png"
                    _plot_sweep(path, sl, metric, axis, series_params)
                    written.append(path)
                    md += ["", f"![{metric} vs {axis}]({path.name})"]

    markdown = "\n".join(md) + "\n"
    report = out_dir / REPORT_FILE
    report.write_text(markdown, encoding="utf-8")
    csv_path = out_dir / SUMMARY_FILE
    write_summary_csv(summary, csv_path)
    return markdown, [report, csv_path, *written]


def _budget_note(budgets: Sequence[Any]) -> str:
    kinds = {kind for kind, _ in _budget_kinds(budgets)}
    notes = {"ratio": "share of each prompt's tokens", "tokens": "tokens per layer and KV head"}
    return "; ".join(notes[k] for k in ("ratio", "tokens") if k in kinds) or "none"


def _budget_kinds(budgets: Sequence[Any]) -> list[tuple[str, list]]:
    """Budgets split into ratios and token counts (they cannot share an x axis)."""
    ratios = [b for b in budgets if isinstance(b, float)]
    tokens = [b for b in budgets if isinstance(b, int) and not isinstance(b, bool)]
    return [(kind, bs) for kind, bs in (("ratio", ratios), ("tokens", tokens)) if bs]


def _sweep_axes(swept: Sequence[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Plot axes: one per swept parameter; recent_ratio and co2's rho share the ``recent_ratio`` axis."""
    axes: dict[str, list[tuple[str, str]]] = {}
    for policy, param in swept:
        axis = "recent_ratio" if param in RECENT_PARAMS else param
        axes.setdefault(axis, []).append((policy, param))
    return list(axes.items())


# -- plots --------------------------------------------------------------------------------------------
def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas draws the PNG

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    return figure, figure.add_subplot()


def _finish(figure, ax, path: Path, sl: _Slice, metric: str, title: str, values: list[float]) -> None:
    ref = sl.reference(metric)
    if ref is not None:
        ax.axhline(ref, color="black", linewidth=1.3, label=f"full attention ({fmt_value(ref, sl.scale(metric))})")
        values = [*values, ref]
        if _has_bar(metric):
            ax.axhline(BAR * ref, color="black", linestyle="--", linewidth=1, label="99% of full (MLPerf bar)")
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if metric in LOWER_IS_BETTER and positive and len(positive) == len(values) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
    ax.set_ylabel(_metric_name(metric))
    ax.set_title(f"{title}\n{sl.title}" + ("" if sl.full else " · no full-attention rows"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=110, format="png")


def _plot_vs_budget(path: Path, sl: _Slice, metric: str, budgets: list, kind: str) -> None:
    figure, ax = _figure()
    scale = 100 if kind == "ratio" else 1
    values: list[float] = []
    for policy in sl.policies:
        for params, groups in sl.main_series(policy):
            points = sorted(
                (g["budget"] * scale, g["metrics"][metric])
                for g in groups
                if g["budget"] in budgets and metric in g["metrics"]
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=_series_label(policy, params))
                values += [y for _, y in points]
    ax.set_xticks([b * scale for b in budgets])
    ax.set_xlabel("KV cache budget (% of prompt tokens)" if kind == "ratio" else "KV cache budget (tokens)")
    _finish(figure, ax, path, sl, metric, f"{_metric_name(metric)} vs KV cache budget", values)


def _plot_sweep(path: Path, sl: _Slice, metric: str, axis: str, series_params: list[tuple[str, str]]) -> None:
    """``metric`` against a swept parameter: one line per (policy, budget, other varying parameters)."""
    figure, ax = _figure()
    values: list[float] = []
    xs_all: set = set()
    for policy, param in series_params:
        lines: dict[str, tuple[tuple, list]] = {}
        for g in sl.groups:
            x = g["params"].get(param)
            if g["policy"] != policy or metric not in g["metrics"] or not _is_number(x):
                continue
            others = {k: v for k, v in g["params"].items() if k != param}
            name = policy if param == axis else f"{policy} {param}"
            label = f"{name} @ budget {fmt_budget(g['budget'])}" + (f", {fmt_params(others)}" if others else "")
            order = (budget_key(g["budget"]), *(_sortable(_norm(v)) for v in others.values()))
            lines.setdefault(label, (order, []))[1].append((x, g["metrics"][metric]))
        for label, (_, points) in sorted(lines.items(), key=lambda item: item[1][0]):
            points.sort()
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
            values += [y for _, y in points]
            xs_all.update(x for x, _ in points)
    if 0 < len(xs_all) <= 12:
        ax.set_xticks(sorted(xs_all))
    ax.set_xlabel(PARAM_LABELS.get(axis, axis))
    what = "temperature" if axis.startswith("tau") else "recent-window" if axis == "recent_ratio" else axis
    _finish(figure, ax, path, sl, metric, f"{_metric_name(metric)} vs {axis} ({what} sweep)", values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
