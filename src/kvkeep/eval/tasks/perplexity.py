"""The perplexity task (CO2's protocol): prefill L tokens, score the next M one at a time through the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...cache import KVKeepCache
from ...generation import generate
from ..data import Sample
from ..metrics import perplexity
from .common import RunContext, Task, encode, model_context, timed

__all__ = ["PERPLEXITY", "PerplexityOptions", "window_starts"]


@dataclass(frozen=True)
class PerplexityOptions:
    """CO2's protocol: ``windows`` windows per document, evenly spaced; each prefills ``prompt_tokens`` (L)
    and scores the next ``eval_tokens`` (M) one at a time through the cache."""

    prompt_tokens: int = 1500
    eval_tokens: int = 100
    windows: int = 4

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.eval_tokens < 1 or self.windows < 1:
            raise ValueError("prompt_tokens, eval_tokens and windows must be >= 1")


def window_starts(n_tokens: int, width: int, windows: int) -> list[int]:
    """Start offsets of ``windows`` windows of ``width`` tokens spread evenly over ``n_tokens``."""
    if n_tokens < width:
        raise ValueError(f"the document has {n_tokens} tokens, fewer than one window of {width}")
    if windows == 1:
        return [0]
    return sorted({round(i * (n_tokens - width) / (windows - 1)) for i in range(windows)})


def _window_nll(model, window: torch.Tensor, prompt_tokens: int, cache: KVKeepCache) -> float:
    """Sum of NLL of the tokens after the first ``prompt_tokens`` of ``window [1, L+M]``: prefill L tokens,
    then feed the rest one at a time through the (compressed) cache (kvkeep's decode loop, teacher-forced)."""
    targets = window[:, prompt_tokens:]
    nll = []

    def score(index: int, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        nll.append(-torch.log_softmax(logits.float(), dim=-1)[0, targets[0, index]])

    generate(model, window[:, :prompt_tokens], cache=cache, max_new_tokens=targets.shape[1], forced=targets,
             on_step=score)  # fmt: skip
    return float(torch.stack(nll).sum())


def _perplexity(ctx: RunContext, samples: list[Sample], policy: str, params: dict) -> list[dict]:
    """Perplexity of each document's evaluated tokens (pooled over its windows) under the policy."""
    model, opts = ctx.model, ctx.options
    L, M = opts["prompt_tokens"], opts["eval_tokens"]
    if L + M > model_context(model):
        raise ValueError(f"--prompt-tokens + --eval-tokens ({L + M}) exceed the model's context")
    parts = []
    for s in samples:
        if ("ids", s.id) not in ctx.memo:
            ctx.memo["ids", s.id] = encode(ctx.tokenizer, s.doc)
        ids = ctx.memo["ids", s.id]
        try:
            starts = window_starts(len(ids), L + M, opts["windows"])
        except ValueError as err:
            raise ValueError(f"sample {s.id}: {err} (--prompt-tokens + --eval-tokens)") from None
        nll, per_window, seconds = 0.0, [], 0.0
        for start in starts:
            window = torch.tensor([ids[start : start + L + M]], device=model.device)
            cache = KVKeepCache(model, policy, **params)
            value, took = timed(model, lambda w=window, c=cache: _window_nll(model, w, L, c))
            nll, seconds = nll + value, seconds + took
            per_window.append(perplexity(value, M))
        count = M * len(starts)
        parts.append(
            {
                "metrics": {"ppl": perplexity(nll, count), "nll": nll / count, "window_ppl": per_window},
                "prompt_tokens": L,
                "new_tokens": M,
                "kv_bytes": cache.nbytes(),  # at the end of a window (the same for every window)
                "kv_bytes_peak": sum(cache.peak_sequence_bytes()),
                "kv_bytes_full": cache.full_nbytes(),
                "floored": cache.floored()[0],
                "seconds": seconds,
                "truncated": False,
                "windows": len(starts),
            }
        )
    return parts


def _ppl_vs_full(row: dict, full: dict) -> dict:
    return {"ppl_vs_full": row["metrics"]["ppl"] / full["metrics"]["ppl"]}


PERPLEXITY = Task(
    name="perplexity",
    description="CO2's protocol: prefill L tokens, score the next M one at a time through the cache",
    options=PerplexityOptions,
    run=_perplexity,
    compare=_ppl_vs_full,
    quality={"ppl": "min"},
)
