"""``kvkeep serve``: an OpenAI-compatible server that evicts tokens while it decodes, with continuous batching."""

from __future__ import annotations

import argparse
import socket
import sys

from .options import add_model_options, add_policy_options, add_tp_option, positive_float, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server (continuous batching over the compressed cache)",
        description="Serve /v1/completions and /v1/chat/completions with KV-cache eviction and continuous batching.",
    )
    add_model_options(parser)
    add_policy_options(parser, static=False)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    group.add_argument("--port", type=port_number, default=8000, help="0: any free port (default: %(default)s)")
    group.add_argument("--served-model-name", help="the model name clients ask for (default: --model)")
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--memory-gib",
        type=float,
        help="memory for weights + cache (default: the GPU's free memory less 2 GiB; 8 on a CPU, with --rows)",
    )
    group.add_argument("--rows", type=positive_int, help="batch rows (default: all --memory-gib holds; a CPU: 4)")
    group.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        help="longest prompt accepted (default: the context less --max-tokens; at most 2048 on a CPU)",
    )
    group.add_argument(
        "--max-tokens", type=positive_int, default=1024, help="most tokens a request may ask for (default: %(default)s)"
    )
    group.add_argument("--prefill-tokens", type=positive_int, help="prompt tokens prefilled between two decode steps")
    add_tp_option(group)
    group.add_argument(
        "--queue-limit",
        type=positive_int,
        default=1024,
        help="waiting requests at most, then 503 (default: %(default)s)",
    )
    group.add_argument(
        "--max-body-mib",
        type=positive_float,
        default=8.0,
        help="request bodies at most, then 413 (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in [0, 65535], got {text!r}")
    return int(text)


def check_model(config) -> None:
    """What the config tells before the weights load: kvkeep supports the family, the engine its layers."""
    from ..hf import config_layer_types, every_layer_slides

    config_layer_types(config)  # kvkeep runs the family (a one-line error otherwise)
    if every_layer_slides(config.get_text_config(decoder=True)):
        raise ValueError(
            f"kvkeep serve supports sliding-window layers beside global ones (Gemma 2, 3), not a model whose every "
            f"layer slides ({config.model_type}): kvkeep generate and the Python API run it (their compacting cache)"
        )


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, or a one-line error naming the fix."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"cannot listen on {host}:{port}: {reason}: choose another --port or --host") from None
    return sock


def run(args: argparse.Namespace) -> int:
    from ..policies import make_policy

    policy = make_policy(args.policy, args.budget, **dict(args.params))
    from ..models import load_config, resolve_device, resolve_dtype, resolve_source

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    source = resolve_source(args.model)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError("kvkeep serve needs fastapi and uvicorn: pip install 'kvkeep[serve]'") from None
    config = load_config(source)
    check_model(config)
    max_prompt, rows = engine_limits(args, config, device)
    from .. import distributed

    # Before loading: a port in use is known at once.  Under --tp only rank 0 serves HTTP.
    sock = listen(args.host, args.port) if distributed.is_main() else None
    app, engine = start_app(args, source, dtype, device, policy, max_prompt, rows)
    if app is None:  # under --tp, a rank other than 0: run rank 0's iterations until it stops
        engine.follow()
        return 0
    host, port = sock.getsockname()[:2]
    print(f"[kvkeep] serving http://{args.host}:{port}/v1", file=sys.stderr, flush=True)
    engine.start()
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run(sockets=[sock])
    finally:
        engine.stop()
    return 0


def engine_limits(args: argparse.Namespace, config, device) -> tuple[int, int | None]:
    """The longest prompt and the rows (None: as many as the memory holds), checked against the context."""
    from ..models import context_length

    context = context_length(config) or 2048
    cpu = device.type == "cpu"  # the torch path attends every slot of every row: keep a CPU server small
    max_prompt = args.max_prompt_tokens or max(1, min(context - args.max_tokens, 2048 if cpu else context))
    rows = args.rows or (4 if cpu and args.memory_gib is None else None)
    if max_prompt + args.max_tokens > context:
        raise ValueError(
            f"--max-prompt-tokens {max_prompt} + --max-tokens {args.max_tokens} exceed the {context}-token context"
        )
    return max_prompt, rows


def start_app(args: argparse.Namespace, source, dtype, device, policy, max_prompt: int, rows: int | None):
    """Load the model and build its engine; on rank 0, the app serving it (``None`` on the other ranks)."""
    import transformers

    from .. import distributed
    from ..cache.cache import hybrid_note
    from ..engine import build
    from ..generation import stop_token_ids
    from ..hf import window_layers
    from ..models import load_model
    from ..serve import create_app

    distributed.start(args.tp, device)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model(source, dtype=dtype, device=device, tp_plan="auto" if args.tp > 1 else None)
    engine = build(
        model, tokenizer, policy, max_prompt=max_prompt, max_tokens=args.max_tokens, memory_gib=args.memory_gib,
        rows=rows, prefill_tokens=args.prefill_tokens, queue_limit=args.queue_limit,
    )  # fmt: skip
    if not distributed.is_main():
        return None, engine
    name = args.served_model_name or args.model
    budget = "" if policy.keeps_all else f" budget {policy.budget}"
    split = f"; tensor-parallel over {args.tp} ranks (rows per rank)" if args.tp > 1 else ""
    print(f"[kvkeep] {name}: {policy.name}{budget}{split}; {engine.plan.describe()}", file=sys.stderr)
    window, sliding = window_layers(model.config.get_text_config(decoder=True))
    note = hybrid_note(model.config.model_type, sliding, window, max_prompt, policy)  # said once, here
    if note is not None:
        print(f"[kvkeep] {note}", file=sys.stderr)
    print(f"[kvkeep] limits: prompts up to {max_prompt} tokens, outputs up to {args.max_tokens}, "
          f"bodies up to {args.max_body_mib:g} MiB, {args.queue_limit} waiting requests", file=sys.stderr)  # fmt: skip
    body_bytes = int(args.max_body_mib * 2**20)
    return create_app(engine, tokenizer, name, stop_token_ids(model, tokenizer), max_body_bytes=body_bytes), engine
