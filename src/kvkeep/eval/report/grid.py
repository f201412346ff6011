"""Runs whose rows carry a context length and a needle depth (the synthetic retrieval tasks): the metric by
context and by depth, with 95% intervals, and the heatmap people know (context length across, needle depth
down, one panel per policy) for each budget."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ..stats import bootstrap_ci, fmt_ci
from .slices import Slice, fmt_budget, metric_name, series_label, slug
from .summary import budget_key, norm, row_budget

__all__ = ["grid_section", "has_grid"]


def has_grid(rows: Sequence[dict]) -> bool:
    """Whether the rows carry a context length (``context``) to lay out."""
    return any(isinstance(r.get("context"), int) for r in rows)


def _series(sl: Slice, rows: Sequence[dict]) -> list[tuple[str, object, list[dict]]]:
    """(label, budget, rows) for full attention and for each policy's main series at each budget."""
    found = [("full", None, [r for r in rows if r["policy"] == "full"])] if sl.full else []
    for policy in sl.policies:
        for params, groups in sl.main_series(policy):
            for budget in sorted({g["budget"] for g in groups}, key=budget_key):
                members = [
                    r
                    for r in rows
                    if r["policy"] == policy
                    and row_budget(r) == budget
                    and all(norm((r.get("params") or {}).get(k)) == norm(v) for k, v in params.items())
                ]
                found.append((series_label(policy, params), budget, members))
    return found


def _values(rows: Sequence[dict], metric: str) -> list[float]:
    found = [(r.get("metrics") or {}).get(metric) for r in rows]
    return [float(v) for v in found if isinstance(v, int | float)]


def _mean_ci(rows: Sequence[dict], metric: str) -> tuple[float, tuple[float, float] | None] | None:
    values = _values(rows, metric)
    if not values:
        return None
    return sum(values) / len(values), (bootstrap_ci(values) if len(values) > 1 else None)


def _cell(rows: Sequence[dict], metric: str) -> str:
    found = _mean_ci(rows, metric)
    if found is None:
        return "–"
    mean, ci = found
    return f"{mean:.3f}" + (f" {fmt_ci(ci)}" if ci else "") + f" (n={len(rows)})"


def _table(series, metric: str, axis: str, values: list) -> list[str]:
    header = ["policy", "budget", *(fmt_axis(axis, v) for v in values)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(values)) + "|"]
    for label, budget, rows in series:
        cells = [_cell([r for r in rows if r.get(axis) == v], metric) for v in values]
        lines.append("| " + " | ".join([label, fmt_budget(budget), *cells]) + " |")
    return lines


def fmt_axis(axis: str, value) -> str:
    if value is None:
        return "–"
    return f"{value} tok" if axis == "context" else f"depth {value:g}"


def grid_section(sl: Slice, rows: Sequence[dict], metrics: Sequence[str], plots: Path | None, prefix: str):
    """The markdown of the context x depth layout of ``rows`` (one slice's), and the heatmaps drawn."""
    series = _series(sl, rows)
    contexts = sorted({r["context"] for r in rows if isinstance(r.get("context"), int)})
    depths = sorted({r.get("depth") for r in rows if r.get("depth") is not None})
    md, written = [], []
    for metric in metrics:
        name = metric_name(metric)
        md += ["", f"### {name} (`{metric}`) by context length", "", *_table(series, metric, "context", contexts)]
        if depths:
            md += ["", f"### {name} (`{metric}`) by needle depth", "", *_table(series, metric, "depth", depths)]
        md += ["", "Mean, its 95% bootstrap interval over samples and the number of samples per cell."]
        if plots is None or not depths:
            continue
        for budget in sorted({b for _, b, _ in series if b is not None}, key=budget_key):
            panels = [(label, rs) for label, b, rs in series if b is None or b == budget]
            path = plots / f"{prefix}_{slug(metric)}_context_depth_budget_{slug(fmt_budget(budget))}.png"
            _heatmaps(path, panels, metric, contexts, depths, f"{name} · KV budget {fmt_budget(budget)} · {sl.title}")
            written.append(path)
            md += ["", f"![{metric} by context and depth, budget {fmt_budget(budget)}]({path.name})"]
    return md, written


def _heatmaps(path: Path, panels, metric: str, contexts: list, depths: list, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.2 + 2.6 * len(panels), 1.8 + 0.45 * len(depths)), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (label, rows) in zip(axes, panels, strict=True):
        cells = defaultdict(list)
        for r in rows:
            cells[r.get("context"), r.get("depth")].append(r)
        grid = [[_avg(_values(cells.get((c, d), []), metric)) for c in contexts] for d in depths]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                ax.text(j, i, "–" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(contexts)), [f"{c // 1024}k" if c % 1024 == 0 else str(c) for c in contexts])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("context (tokens)")
    axes[0].set_ylabel("needle depth")
    figure.colorbar(image, ax=list(axes), shrink=0.8)
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110, format="png")


def _avg(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
