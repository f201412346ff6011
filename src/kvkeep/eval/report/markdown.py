"""The markdown of a report: the header of the run, and per slice the tables of each metric by policy and
budget (with their plots), of the KV bytes kept and of every swept parameter."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..stats import fmt_ci
from .grid import grid_section, has_grid
from .plots import plot_sweep, plot_vs_budget
from .slices import (
    BAR,
    Slice,
    budget_kinds,
    fmt_budget,
    fmt_params,
    fmt_value,
    has_bar,
    metric_name,
    selected_metrics,
    series_label,
    slug,
    sweep_axes,
)
from .summary import budget_key, norm, value_key

CI_LABEL = "(95% CI)"
CI_NOTE = "95% confidence interval (percentile bootstrap over samples, 2000 resamples, seed 0)"


def header(run_dir: Path, rows: list[dict], dropped: int, config: dict) -> list[str]:
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


def section(
    sl: Slice, metrics: Sequence[str] | None, many_models: bool, plots: Path | None, rows: Sequence[dict] = ()
) -> tuple[list[str], list[Path]]:
    """The markdown of one slice, and the plots it drew into ``plots`` (None: no plots); ``rows`` (the slice's)
    with a context length add the context x depth tables and heatmaps (:mod:`.grid`)."""
    setting = fmt_params(sl.options)
    heading = f"## {sl.task} · {sl.dataset}" + (f" · {sl.model}" if many_models else "")
    md = ["", heading + (f" · {setting}" if setting else ""), ""]
    md.append(f"{sl.samples} samples; policies: {', '.join(sl.policies) or 'none but full'}.")
    prefix = slug(sl.dataset) + (f"_{slug(sl.model)}" if many_models else "")
    prefix += f"_{slug(setting)}" if setting else ""
    chosen = selected_metrics(sl, metrics)
    if not sl.full:
        md += ["", "No full-attention rows: no reference value, no 99%-of-full bar."]
    if not chosen:
        return [*md, "", "None of the selected metrics is in these rows."], []
    if not sl.groups:
        for metric in chosen:
            md += ["", f"{metric_name(metric)} ({metric}), full attention: {fmt_value(sl.reference(metric))}"]
        return md, []
    written: list[Path] = []
    for metric in chosen:
        md += _by_budget(sl, metric)
        if plots is not None:
            kinds = budget_kinds(sl.budgets)
            for kind, budgets in kinds:
                suffix = "_tokens" if kind == "tokens" and len(kinds) > 1 else ""
                path = plots / f"{prefix}_{slug(metric)}_vs_budget{suffix}.png"
                plot_vs_budget(path, sl, metric, budgets, kind)
                written.append(path)
                md += ["", f"![{metric} vs budget]({path.name})"]
    md += ["", "### KV bytes kept / full (measured)", "", *_kv_table(sl)]
    md += [
        "",
        'At the end of each request; "peak" is the most a request held (CO2\'s measurement phase), where it '
        'was more, and "floored" counts the rows whose short prompt the policy\'s floor kept whole.',
    ]
    swept = sl.swept()
    for policy, param in swept:
        for metric in chosen:
            md += ["", f"### {policy}: {metric} by `{param}` and budget", "", *_sweep_table(sl, policy, param, metric)]
            ref = sl.reference(metric)
            if ref is not None:
                md += ["", f"Full attention: {fmt_value(ref, sl.scale(metric))}."]
    if plots is not None:
        for axis, series_params in sweep_axes(swept):
            for metric in chosen:
                path = plots / f"{prefix}_{slug(metric)}_vs_{slug(axis)}.png"
                plot_sweep(path, sl, metric, axis, series_params)
                written.append(path)
                md += ["", f"![{metric} vs {axis}]({path.name})"]
    if has_grid(rows):
        lines, drawn = grid_section(sl, rows, chosen, plots, prefix)
        md += lines
        written += drawn
    return md, written


def _by_budget(sl: Slice, metric: str) -> list[str]:
    """The table of ``metric`` by policy and budget, and its note."""
    ref = sl.reference(metric)
    md = ["", f"### {metric_name(metric)} (`{metric}`) by KV budget", "", *_main_table(sl, metric)]
    notes = [f"Mean over samples, and under it its {CI_NOTE}; columns: KV budget ({_budget_note(sl.budgets)})."]
    if ref is not None and has_bar(metric):
        bar = fmt_value(BAR * ref, sl.scale(metric))
        notes.append(f"**Bold**: at least 99% of full attention ({bar}, the MLPerf bar).")
    return [*md, "", " ".join(notes)]


def _budget_note(budgets: Sequence[Any]) -> str:
    kinds = {kind for kind, _ in budget_kinds(budgets)}
    notes = {"ratio": "share of each prompt's tokens", "tokens": "tokens per layer and KV head"}
    return "; ".join(notes[k] for k in ("ratio", "tokens") if k in kinds) or "none"


def _md_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _cell(group: dict | None, metric: str, sl: Slice) -> str:
    if group is None or metric not in group["metrics"]:
        return "–"
    value, ref = group["metrics"][metric], sl.reference(metric)
    text = fmt_value(value, sl.scale(metric))
    if ref is not None and has_bar(metric) and value >= BAR * ref:
        text = f"**{text}**"
    if group["n"] < sl.expected_n:
        text += f" (n={group['n']})"
    return text


def _ci_row(groups: Sequence[dict | None], metric: str, sl: Slice) -> list[str]:
    """The row under a row of means: each mean's 95% bootstrap interval over samples (fewer than 2: none)."""
    cells = []
    for g in groups:
        ci = None if g is None or g["n"] < 2 else g.get("ci", {}).get(metric)
        cells.append(fmt_ci(ci, lambda v: fmt_value(v, sl.scale(metric))))
    return [CI_LABEL, *cells]


def _main_table(sl: Slice, metric: str) -> list[str]:
    ref = sl.reference(metric)
    header = ["policy", *(fmt_budget(b) for b in sl.budgets)]
    body = []
    if ref is not None:
        body.append(["full (no eviction)", *([fmt_value(ref, sl.scale(metric))] * len(sl.budgets))])
        full = sl.full[0] if len(sl.full) == 1 else None
        body.append(_ci_row([full] * len(sl.budgets), metric, sl))
    for policy in sl.policies:
        for params, groups in sl.main_series(policy):
            by_budget = {g["budget"]: g for g in groups}
            row = [series_label(policy, params)]
            row += [_cell(by_budget.get(b), metric, sl) for b in sl.budgets]
            body += [row, _ci_row([by_budget.get(b) for b in sl.budgets], metric, sl)]
    return _md_table(header, body)


def _kv_table(sl: Slice) -> list[str]:
    header = ["policy", *(fmt_budget(b) for b in sl.budgets)]
    body = []
    for policy in sl.policies:
        for params, groups in sl.main_series(policy):
            by_budget = {g["budget"]: g for g in groups}
            cells = [_kv_cell(by_budget[b]) if b in by_budget else "–" for b in sl.budgets]
            body.append([series_label(policy, params), *cells])
    return _md_table(header, body)


def _kv_cell(group: dict) -> str:
    """The share kept at the end, with the peak where it was higher and the rows the floor kept whole."""
    cell = fmt_value(group["kv_ratio"])
    peak = group.get("kv_peak_ratio")
    if peak is not None and group["kv_ratio"] is not None and peak > group["kv_ratio"] * (1 + 1e-9):
        cell += f" (peak {fmt_value(peak)})"
    if group.get("floored"):
        cell += f"; floored {group['floored']}/{group['n']}"
    return cell


def _sweep_table(sl: Slice, policy: str, param: str, metric: str) -> list[str]:
    groups = [g for g in sl.groups if g["policy"] == policy]
    budgets = sorted({g["budget"] for g in groups}, key=budget_key)
    rows: dict[str, tuple[tuple, dict]] = {}
    for g in groups:
        others = {k: v for k, v in g["params"].items() if k != param}
        label = f"{param}={g['params'].get(param)}" + (f"; {fmt_params(others)}" if others else "")
        order = (value_key(norm(g["params"].get(param))), *(value_key(norm(v)) for v in others.values()))
        rows.setdefault(label, (order, {}))[1][g["budget"]] = g
    body = []
    for label, (_, cells) in sorted(rows.items(), key=lambda item: item[1][0]):
        body.append([label, *(_cell(cells.get(b), metric, sl) for b in budgets)])
        body.append(_ci_row([cells.get(b) for b in budgets], metric, sl))
    return _md_table([param, *(fmt_budget(b) for b in budgets)], body)
