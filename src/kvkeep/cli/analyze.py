"""``kvkeep analyze KIND``: an attention or cache analysis of one prompt (:mod:`kvkeep.eval.analyze`).

    kvkeep analyze sparsity --data cnndm --sample 0 --out runs/analysis
    kvkeep analyze cached --data cnndm --policy co2 --budget 0.5 --gamma 0.01 --out runs/analysis

Writes ``OUT/KIND.json`` and ``OUT/KIND.png``; options an analysis does not take keep its defaults.
"""

from __future__ import annotations

import argparse
import sys

from .options import (
    POLICY_NAMES,
    add_model_options,
    add_param_option,
    comma_list,
    parse_budget,
    positive_int,
    read_prompt,
)

#: The analyses, as :data:`kvkeep.eval.analyze.KINDS` names them.
ANALYSES = ("sparsity", "heatmap", "cached", "replacement", "scores")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="attention and cache analyses of one prompt (PNG + JSON)",
        description=(
            "Analyse one prompt: sparsity (share of attention scores below p% of the row max, per layer), heatmap "
            "(attention maps), cached (activated vs kept tokens), replacement (where evictions fall among the "
            "candidates), scores (accumulated score distributions). Writes OUT/KIND.json and OUT/KIND.png. "
            "sparsity and heatmap generate with full attention; the others with --policy."
        ),
    )
    parser.add_argument("kind", choices=ANALYSES, help="the analysis")
    add_model_options(parser)
    group = parser.add_argument_group("input")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a data set name (e.g. cnndm) or a JSONL file; the prompt as in summarization")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-': stdin)")
    source.add_argument("--prompt", help="the prompt text")
    group.add_argument(
        "--sample", type=int, default=0, metavar="N", help="with --data: the N-th sample, 0-based (default: 0)"
    )
    group.add_argument("--chat", action="store_true", help="with --prompt/--prompt-file: wrap in the chat template")
    group.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=1024,
        help="cap on the prompt (the document's end is cut); attention is held as heads x n x n per layer "
        "(default: %(default)s)",
    )
    group.add_argument("--max-new-tokens", type=positive_int, default=64, help="default: %(default)s")
    _add_policy_options(parser.add_argument_group("cache policy (cached, replacement, scores)"))
    _add_analysis_options(parser.add_argument_group("analysis"))
    parser.set_defaults(func=run)


def _add_policy_options(group) -> None:
    group.add_argument("--policy", choices=POLICY_NAMES, help="eviction policy (default: co2)")
    group.add_argument(
        "--budget",
        type=parse_budget,
        help="a ratio of the prompt such as 0.5 or a token count (default: 0.5; none for 'full')",
    )
    add_param_option(group, "N=10 or sinks=4")


def _add_analysis_options(group) -> None:
    group.add_argument(
        "--layers",
        type=comma_list(int, "0,15,-1"),
        help="layers, negative from the end: heatmap's maps (default: first, middle, last); the per-step view of "
        "cached (the first one; default: middle); replacement and scores pool them (default: all)",
    )
    group.add_argument(
        "--heads",
        type=comma_list(int, "0,15,-1"),
        help="heatmap: query heads (default: 0); cached: the KV head of the per-step view (default: 0)",
    )
    group.add_argument("--gamma", type=float, help="cached: activation threshold (default: 0.01)")
    group.add_argument(
        "--thresholds",
        type=comma_list(float, "0.01,0.05"),
        help="sparsity: thresholds as shares of the row max (default: 0.001,0.005,0.01,0.05,0.1)",
    )
    group.add_argument(
        "--steps",
        type=comma_list(int, "0,15,-1"),
        help="scores: decode steps of the snapshots (default: 4, evenly)",
    )
    group.add_argument("--out", required=True, metavar="DIR", help="where KIND.json and KIND.png go")


def analysis_options(args: argparse.Namespace, policy_kinds) -> dict:
    """The keyword arguments of the analysis that the options set (the others keep the function's defaults)."""
    given = {"out": args.out, "max_new_tokens": args.max_new_tokens}
    if args.kind in policy_kinds:
        given.update(policy=args.policy, budget=args.budget, params=dict(args.params))
    if args.kind == "sparsity":
        given["thresholds"] = args.thresholds
    elif args.kind == "heatmap":
        given.update(layers=args.layers, heads=args.heads)
    elif args.kind == "cached":
        given.update(gamma=args.gamma, layer=(args.layers or [None])[0], head=(args.heads or [None])[0])
    elif args.kind == "replacement":
        given["layers"] = args.layers
    else:
        given.update(layers=args.layers, steps=args.steps)
    return {name: value for name, value in given.items() if value is not None}


def run(args: argparse.Namespace) -> int:
    text = None if args.data is not None else read_prompt(args.prompt, args.prompt_file)
    import torch
    import transformers

    from ..eval.analyze import KINDS, POLICY_KINDS, data_prompt, headline, text_prompt, update_result
    from ..eval.tasks import model_context
    from ..models import load_model

    if args.kind not in POLICY_KINDS and (args.budget is not None or args.params or args.policy is not None):
        print(f"[kvkeep] {args.kind} analyses full attention: --policy/--budget/--param are ignored", file=sys.stderr)
    transformers.utils.logging.disable_progress_bar()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    limit = min(args.max_prompt_tokens, model_context(model) - args.max_new_tokens)
    if limit < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context")
    if text is None:
        ids, source = data_prompt(tok, args.data, args.sample, limit)
    else:
        ids, source = text_prompt(tok, text, args.chat, limit)
        source = {"prompt_file": args.prompt_file, **source}
    result = KINDS[args.kind](model, tok, torch.tensor([ids]), **analysis_options(args, POLICY_KINDS))
    update_result(result, source=source, command_line=getattr(args, "command_line", None))
    print(f"[kvkeep] {args.kind}: {headline(result)}", file=sys.stderr)
    print(f"[kvkeep] wrote {result['json']}" + (f" and {result['png']}" if result.get("png") else ""), file=sys.stderr)
    return 0
