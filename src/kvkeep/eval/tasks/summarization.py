"""The summarization task: generate a summary per sample; ROUGE against the references and full attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import Sample
from ..metrics import agreement, rouge
from .common import RunContext, Task, generate_batch, generation_fields, model_context, prompt_ids

__all__ = ["SUMMARIZATION", "SummarizationOptions"]


@dataclass(frozen=True)
class SummarizationOptions:
    """Decoding and prompt of the summarization task.

    ``template``: the prompt with ``{doc}`` and ``{query}`` (None: the data set's); ``max_prompt_tokens``:
    the document's end is cut to fit (None: the model's context minus ``max_new_tokens``).
    """

    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    num_beams: int = 1
    template: str | None = None
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.do_sample and (self.temperature is not None or self.top_p is not None):
            raise ValueError("temperature and top_p need do_sample")
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {self.max_new_tokens}, {self.num_beams}")


def _summarize(ctx: RunContext, samples: list[Sample], policy: str, params: dict) -> list[dict]:
    """Generate a summary per sample (one batched ``generate`` call) and score it against the references."""
    model, tok, opts = ctx.model, ctx.tokenizer, ctx.options
    limit = opts["max_prompt_tokens"] or model_context(model) - opts["max_new_tokens"]
    prompts = []
    for s in samples:
        if ("prompt", s.id) not in ctx.memo:
            template = opts["template"] or ctx.dataset.template
            ctx.memo["prompt", s.id] = prompt_ids(tok, template, s, limit)
        prompts.append(ctx.memo["prompt", s.id])
    generation = {"max_new_tokens": opts["max_new_tokens"], "num_beams": opts["num_beams"], "do_sample": False}
    if opts["do_sample"]:
        torch.manual_seed(ctx.seed)
        generation["do_sample"] = True
        generation.update({k: opts[k] for k in ("temperature", "top_p") if opts[k] is not None})
    outputs, seconds = generate_batch(ctx, [ids for ids, _ in prompts], policy, params, generation)
    return [
        {
            "metrics": {f"{k}_ref": v for k, v in rouge(out["text"], s.refs).items()},
            **generation_fields(out, ids, seconds / len(samples), truncated),
        }
        for s, (ids, truncated), out in zip(samples, prompts, outputs, strict=True)
    ]


def _summary_vs_full(row: dict, full: dict) -> dict:
    vs_full = {f"{k}_full": v for k, v in rouge(row["output"], full["output"]).items()}
    return {**vs_full, **agreement(row["output_ids"], full["output_ids"])}


SUMMARIZATION = Task(
    name="summarization",
    description="generate a summary per sample; ROUGE vs the references and vs full attention's output",
    options=SummarizationOptions,
    run=_summarize,
    compare=_summary_vs_full,
    quality={"rouge1_ref": "max", "rouge2_ref": "max", "rougeL_ref": "max"},
    needs_refs=True,
    batched=True,
)
