"""The ``kvkeep`` command line.

    kvkeep generate --policy keyformer --budget 0.5 --prompt-file article.txt --max-new-tokens 128 [--json]

Each subcommand is two small functions: ``_add_<name>(subparsers)`` declares its options and sets
``func`` to ``_<name>(args) -> int``, which does the work; :data:`COMMANDS` lists the ``_add_`` functions.
A ``ValueError`` from a command (bad budget, unknown policy parameter, missing file, ...) becomes one
line ``kvkeep: error: <message>`` on stderr and exit status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from . import __version__
from .cache import KVKeepCache
from .generation import generate as kvkeep_generate
from .hf import with_cache
from .models import load_model
from .policies import POLICIES

_RESERVED_PARAMS = ("budget", "model", "policy")  # KVKeepCache's own arguments: use the options


# -- value parsers ------------------------------------------------------------------------------------
def parse_budget(text: str) -> float | int:
    """``"0.5"`` -> 0.5 (ratio of the prompt), ``"512"`` -> 512 (tokens): a "." or an "e" means a ratio."""
    try:
        return float(text) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a ratio such as 0.5 or a token count such as 512, got {text!r}"
        ) from None


def parse_value(text: str) -> int | float | bool | str | None:
    """A policy parameter value: int, else float, else true/false, else none, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def comma_list(kind, example: str):
    """An argparse type: ``"a,b,c"`` -> ``[kind(a), kind(b), kind(c)]``, one line naming ``example`` otherwise."""

    def parse(text: str) -> list:
        try:
            return [kind(item.strip()) for item in text.split(",") if item.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            message = f"expected a comma-separated list such as {example}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse


def parse_param(text: str) -> tuple[str, int | float | bool | str | None]:
    """``"KEY=VALUE"`` -> ``(key, parse_value(value))``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    if key in _RESERVED_PARAMS:
        raise argparse.ArgumentTypeError(f"{key} is not a policy parameter: use --{key}")
    return key, parse_value(value)


# -- shared option groups -----------------------------------------------------------------------------
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default="smollm2", help="registry name, local folder or Hugging Face id (default: %(default)s)"
    )
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on cuda, else float32)")


def _add_policy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cache policy")
    group.add_argument(
        "--policy", default="full", choices=list(POLICIES), help="eviction policy (default: %(default)s)"
    )
    group.add_argument(
        "--budget",
        type=parse_budget,
        help="kept tokens: a ratio of the prompt in (0, 1] such as 0.5, or a token count such as 512 (not for 'full')",
    )
    group.add_argument(
        "--param",
        dest="params",
        metavar="KEY=VALUE",
        type=parse_param,
        action="append",
        default=[],
        help="a policy parameter, e.g. sinks=4 or tau_end=3 (repeatable)",
    )
    group.add_argument(
        "--static",
        action="store_true",
        help="fixed-capacity slot buffers after the prompt (the fast GPU decode path: fused kernel, CUDA graph)",
    )


# -- generate -----------------------------------------------------------------------------------------
def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text under a KV-cache policy",
        description="Generate a continuation of one prompt with a KVKeepCache and report the KV memory kept.",
    )
    _add_model_options(parser)
    _add_policy_options(parser)
    group = parser.add_argument_group("prompt and generation")
    prompt = group.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-': stdin)")
    group.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    group.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    group.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    group.add_argument("--temperature", type=float, help="sampling temperature (with --sample)")
    group.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --sample)")
    group.add_argument("--seed", type=int, help="random seed (with --sample)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.set_defaults(func=_generate)


def read_prompt(args: argparse.Namespace) -> str:
    """The ``--prompt`` text, or the content of ``--prompt-file`` (``-``: stdin)."""
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise ValueError(f"cannot read prompt file {args.prompt_file}: {reason}") from None
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def _generate(args: argparse.Namespace) -> int:
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if not args.sample and any(v is not None for v in sampling.values()):
        raise ValueError("--temperature, --top-p and --seed need --sample")
    prompt = read_prompt(args)
    transformers.utils.logging.disable_progress_bar()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat).to(model.device)
    cache = KVKeepCache(model, args.policy, args.budget, static=args.static, **dict(args.params))
    if args.sample:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        options = {"do_sample": True, **{k: v for k, v in sampling.items() if k != "seed" and v is not None}}
    else:
        options = {"do_sample": False}

    cuda = model.device.type == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        prompt_tokens = inputs["input_ids"].shape[1]
        if args.static and not args.sample:  # kvkeep's own loop: CUDA-graph decode steps on a GPU
            run = kvkeep_generate(model, **inputs, cache=cache, max_new_tokens=args.max_new_tokens)
            new_ids = _until_eos(run.tokens[0], tokenizer.eos_token_id)
        else:
            output = model.generate(
                **inputs,
                **with_cache(model, cache),
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **options,
            )
            new_ids = output[0, prompt_tokens:]
        if cuda:
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - start

    kv_bytes, kv_full = cache.nbytes(), cache.full_nbytes()
    result = {
        "text": tokenizer.decode(new_ids, skip_special_tokens=True),
        "model": args.model,
        "policy": cache.policy.name,
        "params": cache.policy.params(),
        "budget": args.budget,
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(new_ids),
        "max_new_tokens": args.max_new_tokens,
        "chat": args.chat,
        "do_sample": args.sample,
        "kv_bytes": kv_bytes,
        "kv_bytes_full": kv_full,
        "kv_ratio": kv_bytes / kv_full if kv_full else None,
        "seconds": seconds,
        "tokens_per_second": len(new_ids) / seconds if seconds > 0 else None,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "kvkeep_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        print(_summary(result), file=sys.stderr)
    return 0


def _until_eos(tokens: torch.Tensor, eos: int | list[int] | None) -> torch.Tensor:
    """``tokens [T]`` up to and including the first end-of-sequence token."""
    stops = torch.isin(tokens, torch.tensor([] if eos is None else eos, device=tokens.device).flatten())
    return tokens[: int(stops.int().argmax()) + 1] if bool(stops.any()) else tokens


def _summary(result: dict) -> str:
    """One line: policy, budget, tokens, KV bytes kept vs full, time."""
    budget = "" if result["budget"] is None else f" budget={result['budget']}"
    share = "" if result["kv_ratio"] is None else f" ({100 * result['kv_ratio']:.1f}%)"
    speed = "" if result["tokens_per_second"] is None else f", {result['tokens_per_second']:.1f} tok/s"
    return (
        f"[kvkeep] {result['policy']}{budget}: {result['prompt_tokens']} prompt + {result['new_tokens']} new "
        f"tokens, KV {_mib(result['kv_bytes'])} of {_mib(result['kv_bytes_full'])}{share}, "
        f"{result['seconds']:.2f} s{speed}"
    )


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


# -- entry point --------------------------------------------------------------------------------------
def _eval_commands() -> tuple:
    from . import bench  # imported here: they build on this module's option helpers
    from .eval import analyze, report, search, sweep

    return (sweep.add_parser, report.add_parser, search.add_parser, analyze.add_parser, bench.add_parser)


COMMANDS = (_add_generate,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvkeep", description="KV-cache compression for transformers models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (*COMMANDS, *_eval_commands()):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors (already printed by argparse)
        return exit_.code if isinstance(exit_.code, int) else 0
    args.command_line = shlex.join(["kvkeep", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as err:
        message = " ".join(str(err).split())
        print(f"kvkeep: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
