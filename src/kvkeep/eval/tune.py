"""Tuning a policy's parameters (``kvkeep tune``): the best point of a grid on calibration samples, then tuned
against default parameters on held-out samples.

    kvkeep tune --policy co2 --data dialogsum --budgets 0.3 --param alpha=0,0.2 --param N=0,20 \\
        --param rho=0.25,0.5 --calibration 8 --heldout 8 --out runs/co2-tune

The first ``calibration`` samples of the data set choose the point of the grid with the best mean of the
metric (default: the task's first quality metric); the next ``heldout`` samples measure it against the
policy's defaults and full attention, with 95% bootstrap intervals and the paired interval of tuned minus
default.  CO2's paper leaves the tuning of ``alpha``, ``N`` and ``rho`` per model and data set open; this
is the plain grid search.  Every point is a sweep row in ``OUT/results.jsonl``: a killed search resumes.
"""

from __future__ import annotations

from statistics import mean

from .report.slices import LOWER_IS_BETTER
from .stats import bootstrap_ci, fmt_ci, paired_bootstrap_ci
from .sweep import Config, Runner, format_table

__all__ = ["tune", "tune_table"]


def _scores(rows: list[dict], config: Config, metric: str) -> list[float]:
    """The metric of ``config``'s rows, in the order of the samples."""
    return [float(r["metrics"][metric]) for r in rows if r["policy"] == config[0] and r["params"] == config[1]]


def _summary(values: list[float]) -> dict:
    return {"mean": mean(values), "ci": bootstrap_ci(values), "n": len(values)}


def tune(
    runner: Runner,
    policy: str,
    budget: float | int,
    grid: list[tuple[str, list]],
    calibration: int,
    heldout: int,
    metric: str | None = None,
) -> dict:
    """Grid search of ``policy`` at ``budget`` on the first ``calibration`` samples; tuned vs default on the next
    ``heldout`` ones.  Returns the metric, its direction, every calibration point, and the held-out summaries."""
    samples = runner.dataset.samples
    if policy == "full" or calibration < 1 or heldout < 1:
        raise ValueError("tune needs a policy other than full, and --calibration and --heldout >= 1")
    if len(samples) < calibration + heldout:
        raise ValueError(f"{runner.dataset.name} has {len(samples)} samples, fewer than {calibration} + {heldout}")
    metric = metric or next(iter(runner.task.quality))
    better = runner.task.quality.get(metric) or ("min" if metric in LOWER_IS_BETTER else "max")
    grid_configs = [c for c in runner.configs([policy], [budget], grid) if c[0] == policy]
    default = [c for c in runner.configs([policy], [budget], []) if c[0] == policy][0]
    calib, held = samples[:calibration], samples[calibration : calibration + heldout]
    rows = runner.run(grid_configs, desc=f"calibration {policy} {budget}", samples=calib)
    if any(metric not in r["metrics"] for r in rows):
        raise ValueError(f"the {runner.task.name} rows have no metric {metric!r}")
    points = [{"params": params, **_summary(_scores(rows, (policy, params), metric))} for _, params in grid_configs]
    best = (max if better == "max" else min)(points, key=lambda p: p["mean"])
    tuned = (policy, best["params"])
    rows = runner.run([default] + [tuned] * (tuned != default), desc=f"held-out {policy} {budget}", samples=held)
    full = [float(r["metrics"][metric]) for r in rows if r["policy"] == "full"]
    scores = {"default": _scores(rows, default, metric), "tuned": _scores(rows, tuned, metric)}
    return {
        "task": runner.task.name,
        "dataset": runner.dataset.name,
        "policy": policy,
        "budget": budget,
        "metric": metric,
        "better": better,
        "grid": [key for key, _ in grid],
        "calibration": {"samples": [s.id for s in calib], "points": points},
        "tuned": best["params"],
        "default": default[1],
        "heldout": {
            "samples": [s.id for s in held],
            "full": _summary(full),
            "default": _summary(scores["default"]),
            "tuned": _summary(scores["tuned"]),
            "tuned_minus_default": {
                "mean": mean(scores["tuned"]) - mean(scores["default"]),
                "ci": paired_bootstrap_ci(scores["tuned"], scores["default"]),
            },
        },
    }


def _cell(summary: dict) -> str:
    ci = summary["ci"]
    shown = ci is not None and summary["n"] > 1
    return f"{summary['mean']:.4f}" + (" " + fmt_ci(ci, lambda v: f"{v:.4f}") if shown else "")


def _shown(params: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={params.get(k)}" for k in keys) or "-"


def tune_table(result: dict) -> str:
    """The calibration grid, then full / default / tuned on the held-out samples, each mean with its 95% CI."""
    keys = result["grid"]
    metric = f"{result['metric']} [95% CI]"
    calib = [[_shown(p["params"], keys), _cell(p)] for p in result["calibration"]["points"]]
    held = result["heldout"]
    lines = [
        ["full", "-", _cell(held["full"])],
        ["default", _shown(result["default"], keys), _cell(held["default"])],
        ["tuned", _shown(result["tuned"], keys), _cell(held["tuned"])],
    ]
    diff = held["tuned_minus_default"]
    ci = diff["ci"]
    return "\n".join(
        [
            f"calibration ({len(result['calibration']['samples'])} samples, {result['better']} {result['metric']}):",
            format_table(["params", metric], calib),
            "",
            f"held-out ({len(held['samples'])} samples):",
            format_table(["config", "params", metric], lines),
            f"tuned - default: {diff['mean']:+.4f}"
            + (" " + fmt_ci(ci, lambda v: f"{v:+.4f}") + " (paired bootstrap)" if ci else ""),
        ]
    )
