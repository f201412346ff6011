"""The tokens one kvkeep tree gives on the real model, to compare two trees token for token (a refactor's check).

Real SmolLM2 (fp32), SummEval articles with the instruction after the article.  For every policy at budget 0.5:
``kvkeep.generate`` on a static cache (a left-padded batch; on CUDA the Triton kernels and a CUDA graph), and
the serving engine over the same prompts (batched, CUDA graph on a GPU).  Greedy, EOS stops.

    PYTHONPATH=<old src> python scripts/same_tokens.py --json old.json
    PYTHONPATH=src python scripts/same_tokens.py --json new.json --against old.json   # exits 1 on a difference
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvkeep
from kvkeep.engine import Request, build
from kvkeep.eval.data import DATASETS, load_dataset
from kvkeep.eval.tasks.common import prompt_ids
from kvkeep.generation import stop_token_ids

POLICIES = ("full", "window", "streaming", "h2o", "keyformer", "co2")


def run_generate(model, prompts: list[list[int]], policy: str, max_tokens: int, stop: set[int]) -> list[list[int]]:
    """``kvkeep.generate`` over the prompts as one left-padded batch on a static cache."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    budget = None if policy == "full" else 0.5
    cache = kvkeep.KVKeepCache(model, policy, budget, static=True)
    run = kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=max_tokens, stop_ids=stop)
    return [run.row(i) for i in range(len(prompts))]


def run_engine(model, tok, prompts: list[list[int]], policy: str, max_tokens: int, stop: set[int]):
    """The engine over the prompts, batched (8 rows); returns the tokens and the seconds it took."""
    budget = None if policy == "full" else 0.5
    engine = build(model, tok, kvkeep.make_policy(policy, budget), max_prompt=2048, max_tokens=max_tokens, rows=8)
    started = time.perf_counter()
    done = engine.run([Request(p, max_tokens, stop_ids=set(stop)) for p in prompts])
    return [r.output_ids for r in done], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--json", required=True)
    parser.add_argument("--against", help="a JSON of another tree: exit 1 if any token differs")
    args = parser.parse_args()
    model, tok = kvkeep.load_model("smollm2", dtype="float32")
    spec = DATASETS["cnndm-after"]
    samples = load_dataset("cnndm-after", limit=args.requests).samples
    prompts = [prompt_ids(tok, spec.template, s, 2048)[0] for s in samples]
    stop = stop_token_ids(model, tok)
    report = {}
    for policy in args.policies.split(","):
        engine_tokens, seconds = run_engine(model, tok, prompts, policy, args.max_tokens, stop)
        report[policy] = {
            "generate": run_generate(model, prompts[:8], policy, args.max_tokens, stop),
            "engine": engine_tokens,
            "engine_s": seconds,
        }
        print(policy, f"engine {seconds:.2f} s", flush=True)
    with open(args.json, "w") as f:
        json.dump(report, f)
    if args.against:
        with open(args.against) as f:
            other = json.load(f)
        differ = {
            f"{policy}/{path}": sum(a != b for a, b in zip(report[policy][path], other[policy][path], strict=True))
            for policy in report
            for path in ("generate", "engine")
        }
        print(json.dumps({"requests differing from the other tree": differ}))
        if any(differ.values()):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
