"""What a prompt costs through kvkeep's cache against a plain SDPA forward, and Keyformer's decode kernel against H2O's.

    python scripts/prefill_cost.py                       # Llama-2-7B shape, random bf16 weights, one H200: ~2 min
    python scripts/prefill_cost.py --json prefill.json   # also every number as JSON
    python scripts/prefill_cost.py --arch tiny-llama --device cpu --prompts 64 --repeats 1   # a smoke run

Prefill: for each prompt length, the median (CUDA events, after warm-up) of one sequence's forward with
``logits_to_keep=1``: first plain transformers SDPA (no kvkeep cache), then the forward that fills a fresh
``KVKeepCache`` under each policy, as the engine's ``ModelRunner.prefill`` runs it (every layer compressed
right after its attention), with the question-aware observation window (``observe``, the default) and without
it (``observe=0``, the published rule).  Decode: one layer's fused decode kernel (``decode_attention``) over
``--rows`` rows of ``--slots`` slots with H2O's and Keyformer's score updates (the whole step:
``scripts/profile_decode.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kvkeep
from kvkeep.bench.speed import random_model
from kvkeep.hf import with_cache

#: (label, policy, parameters): every policy at budget 0.5, the scoring ones with and without the window.
VARIANTS = [
    ("full", "full", {}),
    ("window", "window", {}),
    ("h2o", "h2o", {}),
    ("h2o observe=0", "h2o", {"observe": 0}),
    ("keyformer", "keyformer", {}),
    ("keyformer observe=0", "keyformer", {"observe": 0}),
    ("co2", "co2", {}),
    ("co2 observe=0", "co2", {"observe": 0}),
]


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` (CUDA events; a host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return statistics.median(times)


def prefill_rows(model, prompts: list[int], device: torch.device, warmup: int, repeats: int, budget: float):
    """Per prompt length: the plain SDPA forward and each variant's cache prefill, in milliseconds."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {n: torch.randint(0, model.config.vocab_size, (1, n), generator=gen).to(device) for n in prompts}
    rows = []
    with torch.inference_mode():
        for n, ids in inputs.items():  # before any KVKeepCache switches the model's attention to kvkeep's
            ms = timed(lambda ids=ids: model(input_ids=ids, use_cache=False, logits_to_keep=1), device, warmup, repeats)
            rows.append({"prompt": n, "method": "sdpa (plain)", "ms": ms})
        for n, ids in inputs.items():
            for label, policy, params in VARIANTS:

                def prefill(ids=ids, policy=policy, params=params):
                    cache = kvkeep.KVKeepCache(
                        model, policy, None if policy == "full" else budget, max_new_tokens=64, quiet=True, **params
                    )
                    model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache))

                rows.append({"prompt": n, "method": label, "ms": timed(prefill, device, warmup, repeats)})
    for row in rows:
        plain = next(r["ms"] for r in rows if r["prompt"] == row["prompt"] and r["method"] == "sdpa (plain)")
        row["vs_sdpa"] = row["ms"] / plain
    return rows


def decode_rows(rows: int, slots: int, heads: int, head_dim: int, device: torch.device) -> list[dict]:
    """One layer's decode kernel with H2O's and Keyformer's score (and none), ``do_bench`` medians in ms."""
    import triton

    from kvkeep.kernels.decode import decode_attention
    from kvkeep.policies import ScoreSpec

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (rows, heads, slots, head_dim)
    keys, values = (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    query = torch.randn(rows, heads, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
    positions = torch.arange(slots, device=device).expand(rows, heads, slots).contiguous()
    scores = torch.zeros(rows, heads, slots, device=device)
    tau = torch.full((rows,), 1.5, device=device)
    query_pos = torch.full((rows,), slots, device=device)
    specs = {
        "no score": None,
        "h2o": ScoreSpec(),
        "keyformer": ScoreSpec(mode="tempered", noise_seed=0),
        "tempered, no noise": ScoreSpec(mode="tempered"),
    }
    out = []
    for label, spec in specs.items():

        def step(spec=spec):
            decode_attention(query, keys, values, positions, head_dim**-0.5, scores=scores if spec else None,
                             spec=spec, tau=tau, query_pos=query_pos)  # fmt: skip

        ms = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
        out.append({"rows": rows, "slots": slots, "score": label, "ms": ms})
    h2o = next(r["ms"] for r in out if r["score"] == "h2o")
    for row in out:
        row["vs_h2o"] = row["ms"] / h2o
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-2-7b", help="a kvkeep.bench architecture (tiny-llama: a smoke run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, nargs="+", default=[2048, 3000, 4096])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=141, help="decode rows (the engine's at budget 0.2, 4k prompts)")
    parser.add_argument("--slots", type=int, default=820, help="slots per row (budget 0.2 of 4,096, + 1)")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(args.arch, str(device), dtype)
    prefill = prefill_rows(model, args.prompts, device, args.warmup, args.repeats, args.budget)
    decode = []
    if device.type == "cuda":
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        decode = decode_rows(args.rows, args.slots, config.num_key_value_heads, head_dim, device)

    print(f"{args.arch}, random {dtype} weights, one sequence per prompt, budget {args.budget}")
    print(f"{'prompt':>6}  {'method':<20} {'ms':>8}  {'x sdpa':>6}")
    for row in prefill:
        print(f"{row['prompt']:>6}  {row['method']:<20} {row['ms']:>8.1f}  {row['vs_sdpa']:>6.2f}")
    if decode:
        print(f"\none layer's decode kernel, {args.rows} rows x {args.slots} slots")
        for row in decode:
            print(f"  {row['score']:<20} {1e3 * row['ms']:>8.1f} us  {row['vs_h2o']:>5.2f} x h2o")
    if args.json:
        meta = {"arch": args.arch, "dtype": str(dtype), "budget": args.budget, "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "prefill": prefill, "decode": decode}, f, indent=1)


if __name__ == "__main__":
    main()
