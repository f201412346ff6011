"""``kvkeep budget-search``: per policy, the smallest budget that keeps quality within a target of full attention.

    kvkeep budget-search --task summarization --data cnndm --policies h2o,keyformer,co2 --target 0.99 \\
        --limit 8 --out runs/cnndm-search

Takes the options of ``kvkeep sweep`` but ``--budgets`` (:mod:`kvkeep.eval.search` bisects them); writes
``OUT/search.json``.
"""

from __future__ import annotations

import argparse
import json

from .sweep import add_run_options, config_dict, parse_grid, parse_policies, run_options


def add_parser(subparsers) -> None:
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
    parser.set_defaults(func=run, limit=8)


def run(args: argparse.Namespace) -> int:
    policies, grid = parse_policies(args.policies), parse_grid(args.params)
    from ..eval.search import budget_search, search_table
    from ..eval.sweep import Runner

    runner = Runner(run_options(args))
    result = budget_search(runner, policies, grid, target=args.target, lo=args.lo, hi=args.hi, tol=args.tol)
    samples = f"{result['samples']} samples"
    print(f"{result['task']} on {result['dataset']} ({samples}), target {args.target} of full attention")
    print(search_table(result, args.hi))
    (runner.out / "search.json").write_text(json.dumps({**result, "config": config_dict(args)}, indent=2) + "\n")
    return 0
