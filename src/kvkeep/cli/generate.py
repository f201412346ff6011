"""``kvkeep generate``: one prompt through a KVKeepCache; the text, or one JSON object with the KV bytes kept."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .options import (
    add_model_options,
    add_policy_options,
    add_sampling_options,
    add_tp_option,
    positive_int,
    read_prompt,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text under a KV-cache policy",
        description="Generate a continuation of one prompt with a KVKeepCache and report the KV memory kept.",
    )
    add_model_options(parser)
    add_policy_options(parser)
    group = parser.add_argument_group("prompt and generation")
    prompt = group.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-': stdin)")
    group.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user message")
    group.add_argument("--max-new-tokens", type=positive_int, default=128, help="default: %(default)s")
    add_sampling_options(group)
    group.add_argument(
        "--beyond-context",
        action="store_true",
        help="allow prompt + new tokens beyond the model's context (quality is not what the model was trained for)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    add_tp_option(parser)
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, help="a progress bar on stderr (default: on a terminal)"
    )
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace):
    """What can be checked before a model is loaded: ``(prompt, policy, sampling, device, dtype, source)``."""
    from ..models import resolve_device, resolve_dtype, resolve_source
    from ..policies import make_policy
    from ..sampling import Sampling

    sampled = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    if not args.sample and any(v is not None for v in sampled.values()):
        raise ValueError("--temperature, --top-p and --seed need --sample")
    sampling = None
    if args.sample:
        sampling = Sampling(
            temperature=1.0 if args.temperature is None else args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=0 if args.seed is None else args.seed,
        )
        if sampling.greedy:
            raise ValueError(
                "--sample with --temperature 0 is greedy decoding: drop --sample, or give a temperature > 0"
            )
    policy = make_policy(args.policy, args.budget, **dict(args.params))
    prompt = read_prompt(args.prompt, args.prompt_file)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    return prompt, policy, sampling, device, dtype, resolve_source(args.model)


def check_model(config, prompt_tokens: int, args: argparse.Namespace) -> None:
    """What the model's config tells before its weights are read: kvkeep supports it, ``--static`` suits it,
    and prompt + ``--max-new-tokens`` fit its context (unless ``--beyond-context``)."""
    from ..hf import config_layer_types, every_layer_slides
    from ..models import context_length

    config_layer_types(config)  # kvkeep runs the family (a one-line error otherwise)
    if args.static and every_layer_slides(config.get_text_config(decoder=True)):
        raise ValueError(
            f"--static supports sliding-window layers beside global ones (Gemma 2, 3), not a model whose every "
            f"layer slides ({config.model_type}): drop it"
        )
    context = context_length(config)
    if context and prompt_tokens + args.max_new_tokens > context and not args.beyond_context:
        raise ValueError(
            f"the prompt has {prompt_tokens} tokens and --max-new-tokens asks {args.max_new_tokens} more, beyond "
            f"the {context}-token context of {args.model}: shorten the prompt or lower --max-new-tokens "
            "(or pass --beyond-context to run past it anyway)"
        )


def run(args: argparse.Namespace) -> int:
    prompt, policy, sampling, device, dtype, source = check_args(args)

    import transformers

    from .. import distributed
    from ..cache import KVKeepCache
    from ..models import load_config, load_model, load_tokenizer
    from ..runinfo import run_metadata

    distributed.start(args.tp, device)
    transformers.utils.logging.disable_progress_bar()
    tokenizer = load_tokenizer(source)
    ids = _prompt_ids(tokenizer, prompt, args)
    check_model(load_config(source), ids.shape[1], args)
    model, _ = load_model(source, dtype=dtype, device=device, tp_plan="auto" if args.tp > 1 else None)
    cache = KVKeepCache(model, policy, static=args.static)
    new_ids, seconds = _timed_generate(model, tokenizer, ids, cache, sampling, args)
    kv = _kv_bytes(cache)  # every rank: under --tp, collectives
    if not distributed.is_main():
        return 0
    result = {
        "text": tokenizer.decode(new_ids, skip_special_tokens=True),
        "model": args.model,
        "policy": policy.name,
        "params": policy.params(),
        "budget": args.budget,
        "prompt_tokens": ids.shape[1],
        "new_tokens": len(new_ids),
        "max_new_tokens": args.max_new_tokens,
        "chat": args.chat,
        "do_sample": args.sample,
        **kv,
        "floored": cache.floored()[0],
        "seconds": seconds,
        "tokens_per_second": len(new_ids) / seconds if seconds > 0 else None,
        "tp": args.tp,
        **run_metadata(model),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        print(summary(result), file=sys.stderr)
    return 0


def _prompt_ids(tokenizer, prompt: str, args: argparse.Namespace):
    """``[1, n]`` token ids of ``prompt`` (in the chat template with ``--chat``); an empty one is refused."""
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: model {args.model!r} has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat, verbose=False)["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty after tokenisation: give some text")
    return ids


def _timed_generate(model, tokenizer, ids, cache, sampling, args: argparse.Namespace) -> tuple[list[int], float]:
    """Generate from ``ids [1, n]`` through ``cache``: the new token ids and the seconds it took."""
    import torch

    from .. import distributed
    from ..generation import generate, stop_token_ids

    progress = (sys.stderr.isatty() if args.progress is None else args.progress) and distributed.is_main()
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    run = generate(
        model, ids.to(model.device), cache=cache, max_new_tokens=args.max_new_tokens, sampling=sampling,
        stop_ids=stop_token_ids(model, tokenizer), progress=progress, beyond_context=args.beyond_context,
    )  # fmt: skip
    if cuda:
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    return run.row(0), seconds


def _kv_bytes(cache) -> dict:
    """The K/V bytes ``cache`` keeps now, at its peak and with every token kept, and their ratios."""
    kv_bytes, kv_full = cache.nbytes(), cache.full_nbytes()
    (kv_peak,) = cache.peak_sequence_bytes()
    return {
        "kv_bytes": kv_bytes,
        "kv_bytes_peak": kv_peak,
        "kv_bytes_full": kv_full,
        "kv_ratio": kv_bytes / kv_full if kv_full else None,
        "kv_peak_ratio": kv_peak / kv_full if kv_full else None,
    }


def summary(result: dict) -> str:
    """One line: policy, budget, tokens, KV bytes kept vs full, time."""
    budget = "" if result["budget"] is None else f" budget={result['budget']}"
    share = "" if result["kv_ratio"] is None else f" ({100 * result['kv_ratio']:.1f}%)"
    if result["kv_peak_ratio"] is not None and result["kv_bytes_peak"] > result["kv_bytes"]:
        share += f", peak {_mib(result['kv_bytes_peak'])} ({100 * result['kv_peak_ratio']:.1f}%)"
    if result["floored"]:
        share += f", the budget raised to the floor of {result['params']['floor']} tokens (floor=0: none)"
    speed = "" if result["tokens_per_second"] is None else f", {result['tokens_per_second']:.1f} tok/s"
    return (
        f"[kvkeep] {result['policy']}{budget}: {result['prompt_tokens']} prompt + {result['new_tokens']} new "
        f"tokens, KV {_mib(result['kv_bytes'])} of {_mib(result['kv_bytes_full'])}{share}, "
        f"{result['seconds']:.2f} s{speed}"
    )


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
