"""``kvkeep sweep``: policies x budgets x a parameter grid over a data set, one JSONL row per run.

    kvkeep sweep --task summarization --data cnndm --policies full,h2o,keyformer,co2 --budgets 0.2,0.5 \\
        --param tau_end=1,2,3 --limit 20 --out runs/cnndm

The options of data, model, policies, tasks and run are shared with ``kvkeep budget-search``
(:func:`add_run_options`, :func:`run_options`); :mod:`kvkeep.eval.sweep` does the work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .options import POLICY_NAMES, add_model_options, comma_list, parse_budget, parse_param, positive_int

DEFAULT_BUDGETS = "0.2,0.3,0.5,0.7,0.9"
TASK_NAMES = ("summarization", "perplexity", "retrieval")


def add_run_options(parser: argparse.ArgumentParser, policies: str, budgets: bool = False) -> None:
    """Options shared by ``sweep`` and ``budget-search``: data, model, policies (``--budgets`` too when
    ``budgets``), every task's options, output."""
    group = parser.add_argument_group("data")
    group.add_argument("--task", help=f"{', '.join(TASK_NAMES)} (default: the data set's)")
    group.add_argument(
        "--data", required=True, help="a data set name, a JSONL or .txt file, or a Hugging Face data set NAME[:CONFIG]"
    )
    group.add_argument("--limit", type=int, help="the first N samples only")
    group.add_argument("--doc-field", help="document field of a JSONL file or hub data set (default: article)")
    group.add_argument("--ref-field", help="reference field(s), comma-separated (default: reference)")
    group.add_argument("--id-field", help="sample id field (default: id, else the record index)")
    group.add_argument("--split", default="test", help="split of a hub data set (default: %(default)s)")
    _add_synthetic_options(parser.add_argument_group("synthetic data (passkey, niah, niah-multikey, ...)"))
    add_model_options(parser)
    group = parser.add_argument_group("policies")
    group.add_argument("--policies", default=policies, help="comma-separated (default: %(default)s); full always runs")
    if budgets:
        group.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated ratios or token counts")
    group.add_argument(
        "--param",
        dest="params",
        metavar="KEY=V1,V2",
        action="append",
        default=[],
        help="policy parameter values, a grid over every --param; applies to the policies that have KEY",
    )
    _add_summarization_options(parser.add_argument_group("summarization task"))
    _add_perplexity_options(parser.add_argument_group("perplexity task"))
    group = parser.add_argument_group("run")
    group.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    group.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="samples per generate call, summarization (default: %(default)s)",
    )
    group.add_argument("--out", required=True, metavar="DIR", help="results folder, e.g. runs/NAME")


def _add_synthetic_options(group) -> None:
    group.add_argument(
        "--context",
        dest="contexts",
        type=comma_list(parse_tokens, "1024,4k"),
        help="context lengths in tokens, prompt plus answer (default: 1k,2k,4k,8k)",
    )
    group.add_argument(
        "--depths",
        type=comma_list(float, "0,0.5,1"),
        help="needle depths, 0 (start of the haystack) to 1 (its end) (default: 0,0.25,0.5,0.75,1)",
    )
    group.add_argument("--per-cell", type=positive_int, help="samples per context and depth (default: 1)")


def parse_tokens(text: str) -> int:
    """``"4096"`` or ``"4k"`` (x1024) -> 4096."""
    value = int(text[:-1]) * 1024 if text.lower().endswith("k") else int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _add_summarization_options(group) -> None:
    group.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="tokens to generate (default: 96 for summarization; retrieval: each kind's answer length)",
    )
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, help="sampling temperature (with --sample)")
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --sample)")
    group.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (default: %(default)s)")
    group.add_argument(
        "--template", help="prompt with {doc} and {query}, instruction included (default: the data set's)"
    )
    group.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="truncate the document's end to fit (default: the model's context minus --max-new-tokens)",
    )


def _add_perplexity_options(group) -> None:
    group.add_argument(
        "--prompt-tokens", type=positive_int, default=1500, help="L, prefilled per window (default: %(default)s)"
    )
    group.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=100,
        help="M, scored one at a time per window (default: %(default)s)",
    )
    group.add_argument(
        "--windows", type=positive_int, default=4, help="windows per document, evenly spaced (default: %(default)s)"
    )


def run_options(args: argparse.Namespace):
    """The :class:`kvkeep.eval.sweep.RunOptions` of the parsed options."""
    from ..eval.sweep import RunOptions

    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise ValueError("--temperature and --top-p need --sample")
    summarization = {
        "max_new_tokens": args.max_new_tokens or 96,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "template": args.template,
        "max_prompt_tokens": args.max_prompt_tokens,
    }
    perplexity = {"prompt_tokens": args.prompt_tokens, "eval_tokens": args.eval_tokens, "windows": args.windows}
    retrieval = {"max_new_tokens": args.max_new_tokens}
    synthetic = {k: getattr(args, k) for k in ("contexts", "depths") if getattr(args, k)}
    return RunOptions(
        data=args.data, out=args.out, task=args.task, model=args.model, device=args.device, dtype=args.dtype,
        limit=args.limit, doc_field=args.doc_field, ref_field=args.ref_field, id_field=args.id_field,
        split=args.split, seed=args.seed, batch_size=args.batch_size, per_cell=args.per_cell,
        **{k: tuple(v) for k, v in synthetic.items()},
        task_options={"summarization": summarization, "perplexity": perplexity, "retrieval": retrieval},
    )  # fmt: skip


def config_dict(args: argparse.Namespace) -> dict:
    """The parsed options, as ``config.json`` and ``search.json`` record them."""
    return {k: v for k, v in vars(args).items() if k != "func"}


# -- parsing of the comma-separated lists (checked when the command runs) ---------------------------------
def _items(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"{what} list {text!r} has an empty item")
    return items


def parse_budgets(text: str) -> list[float | int]:
    """``"0.2,0.5,512"`` -> ``[0.2, 0.5, 512]``; a bad item raises a ``ValueError`` naming it."""
    budgets = []
    for item in _items(text, "budget"):
        try:
            budgets.append(parse_budget(item))
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--budgets: {err}") from None
    return budgets


def parse_policies(text: str) -> list[str]:
    """``"full,h2o"`` -> ``["full", "h2o"]``, checked against the policy registry."""
    from ..policies import POLICIES

    names = _items(text, "policy")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(map(repr, unknown))}: choose among {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def expand_range(text: str) -> list[str]:
    """``"0:0.4:0.1"`` -> ``["0", "0.1", "0.2", "0.3", "0.4"]`` (LO:HI:STEP, HI included); anything else as is."""
    parts = text.split(":")
    if len(parts) != 3:
        return [text]
    try:
        lo, hi, step = (float(p) for p in parts)
    except ValueError:
        return [text]
    if step <= 0 or hi < lo:
        raise ValueError(f"--param range {text!r}: need LO <= HI and STEP > 0")
    count = int(round((hi - lo) / step, 9)) + 1
    integral = all(p.lstrip("-").isdigit() for p in parts)
    return [str(int(lo + i * step)) if integral else f"{lo + i * step:.10g}" for i in range(count)]


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """``["tau_end=1,2,3", "sinks=4", "N=0:20:10"]`` -> ``[("tau_end", [1, 2, 3]), ("sinks", [4]),
    ("N", [0, 10, 20])]`` (values as ``--param``; LO:HI:STEP is a range)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        try:
            expanded = [v for value in _items(values, key) for v in expand_range(value)] if sep else [""]
            parsed = [parse_param(f"{key}={value}") for value in expanded]
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--param: {err}") from None
        grid[parsed[0][0]] = [value for _, value in parsed]
    return list(grid.items())


# -- the command ----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="evaluate policies x budgets x parameters on a data set",
        description="Run every policy at every budget (and --param grid) on a data set; append one JSON row per "
        "sample and configuration to DIR/results.jsonl, skipping rows already there.",
    )
    add_run_options(parser, policies=",".join(POLICY_NAMES), budgets=True)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policies, budgets, grid = parse_policies(args.policies), parse_budgets(args.budgets), parse_grid(args.params)
    from ..eval.sweep import Runner, summary_table

    runner = Runner(run_options(args))
    configs = runner.configs(policies, budgets, grid)
    runner.out.mkdir(parents=True, exist_ok=True)
    (runner.out / "config.json").write_text(json.dumps(config_dict(args), indent=2) + "\n")
    start = time.perf_counter()
    rows = runner.run(configs)
    print(summary_table(rows, list(runner.task.quality), [k for k, _ in grid]))
    print(f"{len(rows)} rows in {runner.results} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0
