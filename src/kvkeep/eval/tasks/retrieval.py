"""The retrieval task: the synthetic long-context samples of :mod:`kvkeep.eval.synthetic` (passkey, needle in a
haystack, variable tracking, common words), answered greedily and scored by substring match."""

from __future__ import annotations

from dataclasses import dataclass

from ..data import Sample
from ..metrics import agreement
from ..synthetic import KINDS, build_prompt, score_answers
from .common import RunContext, Task, chat_parts, generate_batch, generation_fields, model_context

__all__ = ["RETRIEVAL", "RetrievalOptions"]


@dataclass(frozen=True)
class RetrievalOptions:
    """``max_new_tokens``: the answer's length (None: the kind's own, long enough for its answer); the prompt
    fills the sample's context minus this."""

    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _prompt(ctx: RunContext, sample: Sample, new_tokens: int) -> tuple[list[int], dict]:
    if ("prompt", sample.id) not in ctx.memo:
        limit = model_context(ctx.model)
        if sample.extra["context"] > limit:
            raise ValueError(f"context {sample.extra['context']} is longer than the model's ({limit} tokens)")
        if "chat" not in ctx.memo:
            ctx.memo["chat"] = chat_parts(ctx.tokenizer)
        ctx.memo["prompt", sample.id] = build_prompt(ctx.tokenizer, sample.extra, new_tokens, ctx.memo["chat"])
    return ctx.memo["prompt", sample.id]


def _retrieve(ctx: RunContext, samples: list[Sample], policy: str, params: dict) -> list[dict]:
    """Answer each sample (one batched greedy ``generate`` call); accuracy: the share of answers in the output."""
    kind = samples[0].extra.get("kind")
    if kind not in KINDS:
        raise ValueError(f"the retrieval task needs a synthetic data set ({', '.join(KINDS)}), got {ctx.dataset.name}")
    new_tokens = ctx.options["max_new_tokens"] or KINDS[kind].max_new_tokens
    prompts = [_prompt(ctx, s, new_tokens) for s in samples]
    generation = {"max_new_tokens": new_tokens, "do_sample": False}
    outputs, seconds = generate_batch(ctx, [ids for ids, _ in prompts], policy, params, generation)
    return [
        {
            "metrics": {"accuracy": score_answers(out["text"], s.refs)},
            "context": s.extra["context"],
            "depth": s.extra["depth"],
            **info,
            **generation_fields(out, ids, seconds / len(samples)),
        }
        for s, (ids, info), out in zip(samples, prompts, outputs, strict=True)
    ]


def _vs_full(row: dict, full: dict) -> dict:
    return agreement(row["output_ids"], full["output_ids"])


RETRIEVAL = Task(
    name="retrieval",
    description="synthetic long-context retrieval (passkey, niah, vt, cwe); accuracy: answers found in the output",
    options=RetrievalOptions,
    run=_retrieve,
    compare=_vs_full,
    quality={"accuracy": "max"},
    needs_refs=True,
    batched=True,
)
