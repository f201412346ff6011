"""Tables and plots from a sweep run (the command: ``kvkeep report runs/NAME [--out DIR] [--metric ...]``).

A sweep writes ``runs/NAME/results.jsonl`` (one JSON object per sample and configuration) and
``runs/NAME/config.json``. This package reads them back, one module a step:

- :func:`load_rows` reads ``results.jsonl`` (:mod:`.reading`);
- :func:`summarize` groups the rows by (task, dataset, model, the task options that vary, policy, budget,
  every policy parameter that varies within the run for that policy) and averages each metric, the KV
  share and the seconds (:mod:`.summary`; :mod:`.slices` is what the tables and plots show of a group);
- :func:`write_report` writes ``report.md`` (markdown tables), ``summary.csv`` (one row per group) and PNG
  plots: each metric against the KV budget per policy, with the full-attention value and the 99%-of-full
  bar (the MLPerf accuracy target, Keyformer Figure 13; perplexity against budget as in CO2 Figure 6), and
  each swept policy parameter (Keyformer's temperature as in its Figure 16, the recent-window ratio as in
  its Figure 12, ...) against the metric (:mod:`.markdown`, :mod:`.summary_csv`, :mod:`.plots`); rows with a
  context length and a needle depth (the synthetic retrieval tasks) also get the metric by context and by
  depth and a heatmap per budget, one panel per policy (:mod:`.grid`).

Every mean comes with its 95% percentile-bootstrap interval over samples (:mod:`kvkeep.eval.stats`): a
``(95% CI)`` row under each row of means, ``<metric>_ci_low``/``_ci_high`` columns in ``summary.csv``.

Rows of one identity (:func:`kvkeep.eval.results.row_key`: configuration, seed, sample and task options;
a resumed sweep appending again) count once: the last one wins. Task options that vary within a run
(``--max-new-tokens 96`` and ``128``) split it into settings, each reported with its own reference. The
policy parameter ``seed`` (Keyformer's noise seed) never splits groups: like the row's ``seed`` it is a
replicate, averaged over.

Matplotlib is imported only to draw the plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..results import RESULTS_FILE, dedupe
from .markdown import header, section
from .reading import CONFIG_FILE, load_config, load_rows
from .slices import slices
from .summary import metric_key, row_slice, setting, summarize, varying_options, varying_params
from .summary_csv import write_summary_csv

__all__ = [
    "CONFIG_FILE",
    "REPORT_FILE",
    "RESULTS_FILE",
    "SUMMARY_FILE",
    "dedupe",
    "load_config",
    "load_rows",
    "summarize",
    "varying_options",
    "varying_params",
    "write_report",
    "write_summary_csv",
]

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.csv"


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
    available = sorted({m for g in summary for m in g["metrics"]}, key=metric_key)
    for metric in metrics or ():
        if metric not in available:
            raise ValueError(f"no row has the metric {metric!r}; available: {', '.join(available) or 'none'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = None
    else:
        plots = out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    md = header(run_dir, rows, dropped, load_config(run_dir))
    if plots is None:
        md += ["", "No plots: matplotlib is not installed (pip install 'kvkeep[eval]')."]
    run_slices = slices(summary, rows)
    many_models = len({sl.model for sl in run_slices}) > 1
    written: list[Path] = []
    settings = varying_options(rows)
    for sl in run_slices:
        mine = [r for r in rows if row_slice(r)[:3] == sl.key[:3] and setting(r, settings) == sl.options]
        lines, drawn = section(sl, metrics, many_models, plots, mine)
        md += lines
        written += drawn
    markdown = "\n".join(md) + "\n"
    report = out_dir / REPORT_FILE
    report.write_text(markdown, encoding="utf-8")
    csv_path = out_dir / SUMMARY_FILE
    write_summary_csv(summary, csv_path)
    return markdown, [report, csv_path, *written]
