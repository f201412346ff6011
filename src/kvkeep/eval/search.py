"""``kvkeep budget-search``: per policy, the smallest budget that keeps quality within a target of full attention.

    kvkeep budget-search --task summarization --data cnndm --policies h2o,keyformer,co2 --target 0.99 \\
        --limit 8 --out runs/cnndm-search

Quality is the task's metrics averaged over the calibration samples (the first ``--limit``): for
summarization each of ROUGE-1/2/L vs the references must be >= target x full attention's; for perplexity
ppl <= full ppl / target.  The budget ratio is bisected on ``[--lo, --hi]`` down to ``--tol``, assuming quality
rises with the budget.  Every evaluated point is a sweep row in ``OUT/results.jsonl``, so points already
evaluated (by a sweep or an earlier search) are not recomputed.  Writes ``OUT/search.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from .sweep import Runner, add_run_options, format_table, mean_metrics, parse_grid, parse_policies

__all__ = ["add_parser", "bisect_budget", "meets_target"]


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


def add_parser(subparsers) -> None:
    """Register ``kvkeep budget-search``."""
    parser = subparsers.add_parser(
        "budget-search",
        help="find each policy's smallest budget within a target of full attention",
        description="Bisect, per policy, the smallest budget ratio whose mean quality on the calibration samples "
        "is within --target of full attention's; reuses and extends the sweep rows in DIR/results.jsonl.",
    )
    add_run_options(parser, policies="h2o,keyformer,co2")
    group = parser.add_argument_group("search")
    group.add_argument(
        "--target", type=float, default=0.99, help="share of full quality to keep (default: %(default)s)"
    )
    group.add_argument("--lo", type=float, default=0.05, help="smallest budget ratio tried (default: %(default)s)")
    group.add_argument("--hi", type=float, default=1.0, help="largest budget ratio tried (default: %(default)s)")
    group.add_argument("--tol", type=float, default=0.05, help="bisection stops at this width (default: %(default)s)")
    parser.set_defaults(func=_search, limit=8)


def _search(args: argparse.Namespace) -> int:
    if not 0 < args.target <= 1:
        raise ValueError(f"--target must be in (0, 1], got {args.target}")
    bisect_budget(lambda b: True, args.lo, args.hi, args.tol)  # validates the range before any work
    policies = [p for p in parse_policies(args.policies) if p != "full"]
    grid = parse_grid(args.params)
    if any(len(values) > 1 for _, values in grid):
        raise ValueError("budget-search takes one value per --param (use sweep for a grid)")
    runner = Runner(args)
    quality = list(runner.task.quality)
    runner.configs(policies, [args.hi], grid)  # validates policies and parameters before any work
    full = mean_metrics(runner.run([], desc="full"), quality)
    report = {}
    for policy in policies:
        points = {}

        def passes(budget: float, policy: str = policy, points: dict = points) -> bool:
            configs = [c for c in runner.configs([policy], [budget], grid) if c[0] == policy]
            rows = [r for r in runner.run(configs, desc=f"{policy} {budget}") if r["policy"] == policy]
            metrics = mean_metrics(rows, quality)
            ok = meets_target(runner.task.quality, metrics, full, args.target)
            points[budget] = {"budget": budget, "metrics": metrics, "passes": ok}
            return ok

        budget, _ = bisect_budget(passes, args.lo, args.hi, args.tol)
        report[policy] = {
            "budget": budget,
            "metrics": points[budget]["metrics"] if budget is not None else None,
            "evaluated": list(points.values()),
        }
    lines = [["full", "-", *full.values(), "-"]]
    for policy, found in report.items():
        shown = found["metrics"] or dict.fromkeys(quality, float("nan"))
        budget = found["budget"] if found["budget"] is not None else f"> {args.hi}"
        lines.append([policy, budget, *shown.values(), len(found["evaluated"])])
    samples = len(runner.dataset.samples)
    print(f"{runner.task.name} on {runner.dataset.name} ({samples} samples), target {args.target} of full attention")
    print(format_table(["policy", "budget", *quality, "evaluated"], lines))
    result = {
        "task": runner.task.name,
        "dataset": runner.dataset.name,
        "samples": samples,
        "target": args.target,
        "full": full,
        "policies": report,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
    }
    (runner.out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
