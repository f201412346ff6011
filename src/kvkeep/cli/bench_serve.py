"""``kvkeep bench-serve``: requests/s, tokens/s, time to first token and per output token, under load."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import comma_list, method_params, parse_param, positive_int

HF_STATIC = "hf-static"


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        pair = (0, 0)
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected a length or a range such as 2048-4096, got {text!r}")
    return pair


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="load-test the serving engine (in process) or a running kvkeep serve",
        description="Send a workload of requests (fixed output lengths) and report requests/s, output tokens/s, "
        "time to first token and time per output token (p50, p99), peak memory and rows in use.",
    )
    target = parser.add_argument_group("target (a running server, or engines built here)")
    target.add_argument("--url", help="a running kvkeep serve, e.g. http://127.0.0.1:8000 (else: in process)")
    target.add_argument("--served-model-name", default="smollm2", help="the model name the server answers to")
    target.add_argument("--model", default="smollm2", help="in process: a model to load (default: %(default)s)")
    target.add_argument("--arch", help="in process: random weights of an architecture instead (e.g. llama-2-7b)")
    target.add_argument("--device")
    target.add_argument("--dtype")
    target.add_argument(
        "--methods", type=comma_list(str, "hf-static,full,h2o"), default=["full", "h2o", "keyformer", "co2"],
        help=f"in process: {HF_STATIC} (transformers' StaticCache + torch.compile, CUDA) and policies",
    )  # fmt: skip
    target.add_argument("--budgets", type=comma_list(float, "0.5,0.2"), default=[0.5], help="default: 0.5")
    target.add_argument(
        "--param", dest="params", metavar="METHOD.KEY=VALUE", type=parse_param, action="append", default=[],
        help="a policy parameter, e.g. co2.N=20 (repeatable)",
    )  # fmt: skip
    target.add_argument(
        "--memory-gib", type=float, help="in process: memory for weights + cache, the same for every method"
    )
    target.add_argument("--rows", type=positive_int, help="in process: rows instead of as many as fit")
    load = parser.add_argument_group("workload and load")
    load.add_argument("--requests", type=positive_int, default=32, help="default: %(default)s")
    load.add_argument("--prompt-tokens", type=_range, default=(256, 512), help="length or range (default: 256-512)")
    load.add_argument("--output-tokens", type=_range, default=(32, 64), help="length or range (default: 32-64)")
    load.add_argument("--concurrency", type=positive_int, help="closed loop: clients in flight (default: all requests)")
    load.add_argument("--rate", type=float, help="open loop: requests per second (Poisson)")
    load.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.rate is not None:
        raise ValueError("give --concurrency or --rate, not both")
    if args.rate is not None and args.rate <= 0:
        raise ValueError(f"--rate must be > 0, got {args.rate}")
    concurrency = args.concurrency if args.rate is None else None
    concurrency = concurrency or (None if args.rate else args.requests)
    from ..bench import serve as bench

    if args.url:
        import httpx

        try:
            vocab = httpx.get(f"{args.url.rstrip('/')}/health", timeout=10).json()["vocab_size"]
        except (httpx.HTTPError, ValueError, KeyError) as err:
            raise ValueError(f"--url {args.url}: no kvkeep server answers there ({err})") from None
        load = bench.workload(args.requests, args.prompt_tokens, args.output_tokens, vocab, args.seed)
        records, makespan, health = bench.drive_http(args.url, args.served_model_name, load, concurrency=concurrency,
                                                     rate=args.rate, seed=args.seed)  # fmt: skip
        extra = {k: health.get(k) for k in bench.ENGINE_STATS}
        rows = [bench.as_row("server", bench.summarize(records, makespan, **extra))]
        meta = {"url": args.url, "model": args.served_model_name, "workload": load.description}
    else:
        params = method_params(args.params)
        rows, meta = bench.run_methods(
            model_name=args.model, arch=args.arch, device=args.device, dtype=args.dtype, methods=args.methods,
            budgets=args.budgets, params=params, memory_gib=args.memory_gib, rows=args.rows, requests=args.requests,
            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, concurrency=concurrency,
            rate=args.rate, seed=args.seed,
        )  # fmt: skip
    meta["command"] = getattr(args, "command_line", None)
    table = bench.markdown(rows, meta)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(f"[kvkeep] {len(rows)} rows", file=sys.stderr)
    return 0
