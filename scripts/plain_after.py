"""Is a model as fast outside kvkeep after kvkeep has run on it?  (Issue 17: a model switched to kvkeep's
attention must still run plain forwards and ``model.generate`` with its own cache at transformers' speed.)

Times a plain forward of ``--tokens`` tokens and ``model.generate`` (its own DynamicCache) before any
KVKeepCache exists and after one has been used, in one process, and prints a table; ``--json`` writes it.

    python scripts/plain_after.py --tokens 2048 --json /tmp/plain_after.json
    python scripts/plain_after.py --arch llama-2-7b --tokens 3000 --json /tmp/plain_after_7b.json  # random bf16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvkeep
from kvkeep.hf import with_cache


def timed(fn, repeats: int) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--arch", help="instead of --model: random bfloat16 weights of a kvkeep bench architecture")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.arch:
        from kvkeep.bench.speed import random_model

        model = random_model(args.arch, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
        args.model = f"{args.arch} (random bf16)"
    else:
        model, _ = kvkeep.load_model(args.model)
    ids = torch.randint(100, 10_000, (1, args.tokens), device=model.device)
    short = ids[:, : args.tokens // 4]

    def forward():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def generate():
        return model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=0)  # fmt: skip

    rows = {}
    with torch.inference_mode():
        before = model.config._attn_implementation
        rows["before"] = {"forward_ms": timed(forward, args.repeats), "generate_ms": timed(generate, args.repeats)}
        cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5)
        model(input_ids=short, use_cache=True, **with_cache(model, cache))  # kvkeep runs on the model
        rows["after"] = {"forward_ms": timed(forward, args.repeats), "generate_ms": timed(generate, args.repeats)}
    print(f"{args.model}, {args.tokens}-token forward, generate {short.shape[1]} + {args.new_tokens} tokens, "
          f"{model.device}, attention {before} -> {model.config._attn_implementation}")  # fmt: skip
    print("| | forward ms | generate ms |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} kvkeep | {row['forward_ms']:.1f} | {row['generate_ms']:.1f} |")
    ratio = {k: rows["after"][k] / rows["before"][k] for k in rows["before"]}
    print(f"after / before: forward {ratio['forward_ms']:.2f}x, generate {ratio['generate_ms']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "device": str(model.device), **rows}, f, indent=1)


if __name__ == "__main__":
    main()
