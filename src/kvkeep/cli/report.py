"""``kvkeep report RUN_DIR``: report.md, summary.csv and PNG plots of a sweep (:mod:`kvkeep.eval.report`)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tables and plots from a sweep's results",
        description=(
            "Summarise a sweep run (RUN_DIR/results.jsonl): report.md with tables of each metric by policy and "
            "KV budget, summary.csv with one row per group, and PNG plots of each metric against the budget and "
            "against every swept policy parameter. The markdown is printed too."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a sweep's output folder (holds results.jsonl)")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: RUN_DIR)")
    parser.add_argument(
        "--metric",
        dest="metrics",
        metavar="NAME",
        nargs="+",
        action="extend",
        help="metrics of the tables and plots (default: rouge1_ref rouge2_ref rougeL_ref; ppl for perplexity)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.report import REPORT_FILE, SUMMARY_FILE, write_report

    markdown, paths = write_report(args.run_dir, args.out, args.metrics)
    print(markdown, end="")
    plots = sum(path.suffix == ".png" for path in paths)
    print(f"[kvkeep] wrote {REPORT_FILE}, {SUMMARY_FILE} and {plots} plots to {paths[0].parent}", file=sys.stderr)
    return 0
