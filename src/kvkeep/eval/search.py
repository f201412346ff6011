"""Per policy, the smallest budget that keeps quality within a target of full attention (``kvkeep budget-search``).

    kvkeep budget-search --task summarization --data cnndm --policies h2o,keyformer,co2 --target 0.99 \\
        --limit 8 --out runs/cnndm-search

Quality is the task's metrics averaged over the calibration samples (the first ``--limit``): for
summarization each of ROUGE-1/2/L vs the references must be >= target x full attention's; for perplexity
ppl <= full ppl / target.  The budget ratio is bisected on ``[--lo, --hi]`` down to ``--tol``, assuming quality
rises with the budget.  Every evaluated point is a sweep row in ``OUT/results.jsonl``, so points already
evaluated (by a sweep or an earlier search) are not recomputed.  The command writes ``OUT/search.json``.
"""

from __future__ import annotations

from collections.abc import Callable

from .sweep import Runner, format_table, mean_metrics

__all__ = ["bisect_budget", "budget_search", "meets_target", "search_table"]


def meets_target(quality: dict[str, str], metrics: dict, full: dict, target: float) -> bool:
    """Whether every quality metric is within ``target`` of full attention's (``"max"``: higher is better)."""
    return all(
        metrics[name] >= target * full[name] if better == "max" else metrics[name] <= full[name] / target
        for name, better in quality.items()
    )


def bisect_budget(
    passes: Callable[[float], bool], lo: float, hi: float, tol: float
) -> tuple[float | None, list[tuple[float, bool]]]:
    """The smallest budget in ``[lo, hi]`` (to within ``tol``) for which ``passes`` holds, assuming it is
    monotone; ``None`` when even ``hi`` fails.  Also returns every (budget, passed) evaluated, in order."""
    if not 0 < lo < hi <= 1 or tol <= 0:
        raise ValueError(f"need 0 < --lo < --hi <= 1 and --tol > 0, got lo={lo}, hi={hi}, tol={tol}")
    evaluated: list[tuple[float, bool]] = []

    def check(budget: float) -> bool:
        evaluated.append((budget, passes(budget)))
        return evaluated[-1][1]

    if not check(hi):
        return None, evaluated
    if check(lo):
        return lo, evaluated
    while hi - lo > tol:
        mid = round((lo + hi) / 2, 4)  # rounded, so the same point gets the same row key every time
        if mid in (lo, hi):
            break
        if check(mid):
            hi = mid
        else:
            lo = mid
    return hi, evaluated


def budget_search(
    runner: Runner, policies: list[str], grid: list[tuple[str, list]], target: float, lo: float, hi: float, tol: float
) -> dict:
    """Bisect each policy's smallest budget within ``target`` of full attention (``grid``: one value per key).

    Returns ``task``, ``dataset``, ``samples``, ``target``, ``full`` (full attention's mean quality metrics)
    and ``policies``: per policy the ``budget`` found (None: even ``hi`` fails), its ``metrics`` and every
    point ``evaluated``.
    """
    if not 0 < target <= 1:
        raise ValueError(f"--target must be in (0, 1], got {target}")
    bisect_budget(lambda b: True, lo, hi, tol)  # validates the range before any work
    if any(len(values) > 1 for _, values in grid):
        raise ValueError("budget-search takes one value per --param (use sweep for a grid)")
    policies = [p for p in policies if p != "full"]
    quality = list(runner.task.quality)
    runner.configs(policies, [hi], grid)  # validates policies and parameters before any work
    full = mean_metrics(runner.run([], desc="full"), quality)
    found = {}
    for policy in policies:
        points = {}

        def passes(budget: float, policy: str = policy, points: dict = points) -> bool:
            configs = [c for c in runner.configs([policy], [budget], grid) if c[0] == policy]
            rows = [r for r in runner.run(configs, desc=f"{policy} {budget}") if r["policy"] == policy]
            metrics = mean_metrics(rows, quality)
            ok = meets_target(runner.task.quality, metrics, full, target)
            points[budget] = {"budget": budget, "metrics": metrics, "passes": ok}
            return ok

        budget, _ = bisect_budget(passes, lo, hi, tol)
        found[policy] = {
            "budget": budget,
            "metrics": points[budget]["metrics"] if budget is not None else None,
            "evaluated": list(points.values()),
        }
    return {
        "task": runner.task.name,
        "dataset": runner.dataset.name,
        "samples": len(runner.dataset.samples),
        "target": target,
        "full": full,
        "policies": found,
    }


def search_table(result: dict, hi: float) -> str:
    """The found budget and quality of each policy (``> hi``: none found), under full attention's."""
    quality = list(result["full"])
    lines = [["full", "-", *result["full"].values(), "-"]]
    for policy, found in result["policies"].items():
        shown = found["metrics"] or dict.fromkeys(quality, float("nan"))
        budget = found["budget"] if found["budget"] is not None else f"> {hi}"
        lines.append([policy, budget, *shown.values(), len(found["evaluated"])])
    return format_table(["policy", "budget", *quality, "evaluated"], lines)
