"""``kvkeep tune``: a policy's parameters searched on calibration samples, then tuned vs default on held-out ones.

    kvkeep tune --policy co2 --data dialogsum --budgets 0.3 --param alpha=0,0.2 --param N=0,20 \\
        --param rho=0.25,0.5 --calibration 8 --heldout 8 --out runs/co2-tune

Takes the options of ``kvkeep sweep``; ``--param KEY=LO:HI:STEP`` is a range.  Writes ``OUT/tune.json``
(:mod:`kvkeep.eval.tune` does the work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from .options import positive_int
from .sweep import add_run_options, config_dict, parse_budgets, parse_grid, parse_policies, run_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="search a policy's parameters on calibration samples; tuned vs default on held-out ones",
        description="Grid search of one policy's parameters (--param KEY=V1,V2 or KEY=LO:HI:STEP) at each budget on "
        "the first --calibration samples, then the best point against the policy's defaults and full attention "
        "on the next --heldout samples, with 95%% bootstrap intervals. Rows go to DIR/results.jsonl (resumable).",
    )
    add_run_options(parser, policies="co2", budgets=True)
    group = parser.add_argument_group("tuning")
    group.add_argument("--policy", dest="policies", help="the policy to tune (default: co2)")
    group.add_argument("--calibration", type=positive_int, default=8, help="calibration samples (default: 8)")
    group.add_argument("--heldout", type=positive_int, default=8, help="held-out samples (default: 8)")
    group.add_argument("--metric", help="the metric to optimise (default: the task's first quality metric)")
    parser.set_defaults(func=run, budgets="0.3")


def run(args: argparse.Namespace) -> int:
    policies, budgets, grid = parse_policies(args.policies), parse_budgets(args.budgets), parse_grid(args.params)
    if len(policies) != 1 or policies[0] == "full":
        raise ValueError(f"--policy takes one policy other than full, got {args.policies}")
    if not grid:
        raise ValueError("give the grid to search with --param KEY=V1,V2 (or KEY=LO:HI:STEP)")
    from ..eval.sweep import Runner
    from ..eval.tune import tune, tune_table

    limit = args.calibration + args.heldout
    if args.limit is not None and args.limit < limit:
        raise ValueError(f"--limit {args.limit} is below --calibration + --heldout ({limit})")
    runner = Runner(dataclasses.replace(run_options(args), limit=limit))
    results = []
    for budget in budgets:
        result = tune(runner, policies[0], budget, grid, args.calibration, args.heldout, args.metric)
        print(f"{result['policy']} at budget {budget} on {result['dataset']} ({result['task']})")
        print(tune_table(result) + "\n")
        results.append(result)
    (runner.out / "tune.json").write_text(
        json.dumps({"results": results, "config": config_dict(args)}, indent=2) + "\n"
    )
    return 0
