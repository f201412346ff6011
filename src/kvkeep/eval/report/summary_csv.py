"""``summary.csv``: one row per group of a run's summary."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .summary import metric_key


def write_summary_csv(summary: list[dict], path: Path) -> None:
    """One row per group: keys, ``param_<name>`` for each varying parameter, ``option_<name>`` for each
    varying task option, n, kv_ratio, kv_peak_ratio, floored, seconds, metrics, and ``<metric>_ci_low`` /
    ``<metric>_ci_high`` (the 95% bootstrap interval of each mean over samples)."""
    params = sorted({name for g in summary for name in g["params"]})
    options = sorted({name for g in summary for name in g["options"]})
    metrics = sorted({m for g in summary for m in g["metrics"]}, key=metric_key)
    fields = ["task", "dataset", "model", "policy", "budget", *(f"param_{p}" for p in params)]
    fields += [*(f"option_{o}" for o in options), "n", "kv_ratio", "kv_peak_ratio", "floored", "seconds", *metrics]
    fields += [f"{m}_{end}" for m in metrics for end in ("ci_low", "ci_high")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for g in summary:
        row = {k: g[k] for k in ("task", "dataset", "model", "policy", "n")}
        row["budget"] = "" if g["budget"] is None else g["budget"]
        row.update({f"param_{p}": g["params"].get(p, "") for p in params})
        row.update({f"option_{o}": g["options"].get(o, "") for o in options})
        row.update({k: "" if g.get(k) is None else g[k] for k in ("kv_ratio", "kv_peak_ratio", "floored", "seconds")})
        row.update({m: g["metrics"].get(m, "") for m in metrics})
        for m in metrics:
            low, high = g.get("ci", {}).get(m, ("", ""))
            row.update({f"{m}_ci_low": low, f"{m}_ci_high": high})
        writer.writerow(row)
    path.write_text(buffer.getvalue(), encoding="utf-8")
