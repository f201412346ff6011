"""Does the engine give every request the tokens kvkeep's compacting path gives it, batched, alone on a fresh
engine, and alone on an engine that has served others?  (Issue 19, item 13: CO2 on the GPU.)

Real SmolLM2, SummEval articles with the instruction after the article, the model's EOS as stop id.  Prints
one line per (policy, variant) with the requests that differ from the reference and where they first differ;
writes the JSON to ``--json``.

    python scripts/engine_check.py --policies co2,h2o --requests 100 --alone 20 --json /tmp/engine_check.json

``--against alone`` checks batch invariance alone (issue 17): every request batched against the same request
alone on the engine (``--alone`` of them, all by default), no compacting reference.

    python scripts/engine_check.py --policies full,window,streaming,h2o,keyformer,co2 --variants graph \
        --against alone --max-tokens 32 --json /tmp/batch_invariance.json
"""

from __future__ import annotations

import argparse
import json

import torch

import kvkeep
from kvkeep.engine import Request, build
from kvkeep.eval.data import DATASETS, load_dataset
from kvkeep.eval.tasks.common import prompt_ids
from kvkeep.generation import stop_token_ids
from kvkeep.hf import with_cache
from kvkeep.policies import make_policy

#: Engine variants: CUDA graph + Triton (the default on a GPU), Triton without the graph, the torch kernels.
VARIANTS = {"graph": {}, "eager": {"cuda_graph": False}, "torch": {"cuda_graph": False, "kernel": "torch"}}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where ``a`` and ``b`` differ (None: equal)."""
    shorter = min(len(a), len(b))
    same = len(a) == len(b)
    return next((i for i in range(shorter) if a[i] != b[i]), None if same else shorter)


def reference(model, prompt: list[int], policy, max_tokens: int, stop: set[int]) -> list[int]:
    """kvkeep's compacting path (torch kernel), alone."""
    cache = kvkeep.KVKeepCache(model, policy, kernel="torch", max_new_tokens=max_tokens)
    ids = torch.tensor([prompt], device=model.device)
    return kvkeep.generate(model, ids, cache=cache, max_new_tokens=max_tokens, stop_ids=stop).row(0)


def repeatable_prefill(model, prompts: list[list[int]], policy) -> dict:
    """Prompts whose compressed cache (kept positions, scores) differs between two prefills on the default kernel."""
    differ = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=model.device)
        runs = []
        for _ in range(2):
            cache = kvkeep.KVKeepCache(model, policy, max_new_tokens=8)
            with torch.inference_mode():
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
            runs.append([(layer.positions.clone(), layer.scores.clone()) for layer in cache.layers])
        same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*runs, strict=True))
        if not same:
            differ.append(i)
    return {"policy": policy.name, "check": "prefill twice", "n": len(prompts), "differ": differ}


def check_variant(model, tok, policy, prompts, alone: int, refs, variant: str, args, stop) -> list[dict]:
    """One engine variant's lines: batched, alone on a used engine and alone on fresh ones, each against
    ``refs`` (the compacting path), or, with ``refs=None``, batched against alone on the used engine."""

    def make():
        return build(model, tok, policy, max_prompt=2048, max_tokens=args.max_tokens, rows=args.rows,
                     **VARIANTS[variant])  # fmt: skip

    def ask(prompt):
        return Request(prompt, args.max_tokens, stop_ids=list(stop))

    served = make()
    batched = served.run([ask(p) for p in prompts])
    used = [served.run([ask(p)])[0] for p in prompts[:alone]]
    if refs is None:
        checks = (("batched-vs-alone", batched[:alone], [r.output_ids for r in used]),)
    else:
        fresh = [make().run([ask(p)])[0] for p in prompts[: min(3, alone)]]
        checks = (("batched", batched[:alone], refs), ("alone-used", used, refs), ("alone-fresh", fresh, refs))
    lines = []
    for kind, got, want in checks:
        diffs = {i: first_difference(r.output_ids, want[i]) for i, r in enumerate(got)}
        bad = {i: d for i, d in diffs.items() if d is not None}
        lines.append({"policy": policy.name, "variant": variant, "kind": kind, "n": len(got), "differ": len(bad),
                      "first_step": bad})  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", default="co2")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--alone", type=int, default=20)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--variants", default="graph,eager,torch")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--param", action="append", default=[], help="a policy parameter, name=value")
    parser.add_argument(
        "--against",
        choices=["compacting", "alone"],
        default="compacting",
        help="the reference: kvkeep's compacting path, or each request alone on the engine",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tok = kvkeep.load_model("smollm2", dtype=args.dtype)
    spec = DATASETS["cnndm-after"]
    samples = load_dataset("cnndm-after", limit=args.requests).samples
    prompts = [prompt_ids(tok, spec.template, s, 2048)[0] for s in samples]
    stop = stop_token_ids(model, tok)
    report = []
    for name in args.policies.split(","):
        params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
        policy = make_policy(name, budget=args.budget, **params)
        if args.against == "compacting":
            report.append(repeatable_prefill(model, prompts[: args.alone], policy))
            print(json.dumps(report[-1]), flush=True)
        alone = args.requests if args.against == "alone" else args.alone
        refs = None
        if args.against == "compacting":
            refs = [reference(model, p, policy, args.max_tokens, stop) for p in prompts[:alone]]
        for variant in args.variants.split(","):
            for line in check_variant(model, tok, policy, prompts, alone, refs, variant, args, stop):
                print(json.dumps(line), flush=True)
                report.append(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if any(line["differ"] for line in report):
        raise SystemExit("some requests differ from kvkeep's compacting path (see above)")


if __name__ == "__main__":
    main()
