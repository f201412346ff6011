"""``kvkeep bench``: prefill, decode latency, throughput and memory of every policy against transformers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import POLICY_NAMES, add_tp_option, comma_list, method_params, parse_param

HF_METHODS = ("hf-sdpa", "hf-eager")
METHODS = (*HF_METHODS, *POLICY_NAMES)


def _methods(text: str) -> list[str]:
    methods = comma_list(str, "h2o,keyformer")(text)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    return methods


def _batch(item: str) -> str | int:
    return "max" if item == "max" else int(item)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure prefill, decode latency, throughput and memory of every policy against transformers",
        description="Every case generates greedily after random prompts, with random weights of a real "
        "architecture; batch 'max' is the largest batch that fits --memory-gib.",
    )
    parser.add_argument(
        "--arch",
        default="llama-2-7b",
        help="llama-2-7b, llama-3-8b, llama-2-70b (with --tp) or tiny-llama (random weights)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", help="default: bfloat16 on cuda, else float32")
    parser.add_argument("--methods", type=_methods, default=list(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--budgets", type=comma_list(float, "0.2,0.5"), default=[0.2, 0.5], help="default: 0.2,0.5")
    parser.add_argument("--prompts", type=comma_list(int, "2048,4096"), default=[2048, 4096], help="default: 2048,4096")
    parser.add_argument("--gens", type=comma_list(int, "256,1024"), default=[256, 1024], help="default: 256,1024")
    parser.add_argument("--batches", type=comma_list(_batch, "1,8,max"), default=[1, 8, "max"], help="default: 1,8,max")
    parser.add_argument("--memory-gib", type=float, help="memory for batch 'max' (default: the GPU's, less 2 GiB)")
    parser.add_argument(
        "--param", dest="params", metavar="METHOD.KEY=VALUE", type=parse_param, action="append", default=[],
        help="a policy parameter, e.g. co2.N=20 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--fit-from", metavar="JSON", nargs="+", default=[],
        help="earlier bench JSON whose measured peaks size batch 'max' (else two probe batches are measured first)",
    )  # fmt: skip
    add_tp_option(parser, "GPUs")
    parser.add_argument("--json", metavar="PATH", help="write meta and rows as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = method_params(args.params)
    earlier = []
    for path in args.fit_from:
        try:
            earlier += json.loads(Path(path).read_text())["rows"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--fit-from {path}: not a kvkeep bench JSON ({err})") from None
    from .. import distributed
    from ..bench.speed import bench, write
    from ..models import resolve_device

    distributed.start(args.tp, resolve_device(args.device))
    main = distributed.is_main()  # every rank runs the cases; rank 0 prints and writes
    rows, meta = bench(
        arch=args.arch, device=args.device, dtype=args.dtype, methods=args.methods, budgets=args.budgets,
        prompts=args.prompts, gens=args.gens, batches=args.batches, memory_gib=args.memory_gib, params=params,
        fit_from=earlier, command=args.command_line, tp=args.tp,
        report=lambda line: print(line, flush=True) if main else None,
    )  # fmt: skip
    if main:
        print(write(rows, meta, args.json, args.markdown))
    return 0
