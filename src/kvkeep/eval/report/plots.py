"""The plots of a report: each metric against the KV budget, and against every swept policy parameter."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .slices import (
    BAR,
    LOWER_IS_BETTER,
    PARAM_LABELS,
    Slice,
    fmt_budget,
    fmt_params,
    fmt_value,
    has_bar,
    metric_name,
    series_label,
)
from .summary import budget_key, norm, value_key


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas draws the PNG

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    return figure, figure.add_subplot()


def _finish(figure, ax, path: Path, sl: Slice, metric: str, title: str, values: list[float]) -> None:
    ref = sl.reference(metric)
    if ref is not None:
        ax.axhline(ref, color="black", linewidth=1.3, label=f"full attention ({fmt_value(ref, sl.scale(metric))})")
        values = [*values, ref]
        if has_bar(metric):
            ax.axhline(BAR * ref, color="black", linestyle="--", linewidth=1, label="99% of full (MLPerf bar)")
    positive = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if metric in LOWER_IS_BETTER and positive and len(positive) == len(values) and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
    ax.set_ylabel(metric_name(metric))
    ax.set_title(f"{title}\n{sl.title}" + ("" if sl.full else " · no full-attention rows"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=110, format="png")


def plot_vs_budget(path: Path, sl: Slice, metric: str, budgets: list, kind: str) -> None:
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
                ax.plot(*zip(*points, strict=True), marker="o", label=series_label(policy, params))
                values += [y for _, y in points]
    ax.set_xticks([b * scale for b in budgets])
    ax.set_xlabel("KV cache budget (% of prompt tokens)" if kind == "ratio" else "KV cache budget (tokens)")
    _finish(figure, ax, path, sl, metric, f"{metric_name(metric)} vs KV cache budget", values)


def plot_sweep(path: Path, sl: Slice, metric: str, axis: str, series_params: list[tuple[str, str]]) -> None:
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
            order = (budget_key(g["budget"]), *(value_key(norm(v)) for v in others.values()))
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
    _finish(figure, ax, path, sl, metric, f"{metric_name(metric)} vs {axis} ({what} sweep)", values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
