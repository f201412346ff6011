"""Evaluation tasks: how one policy configuration is run on samples and scored.

A :class:`Task` declares its options (a frozen dataclass with defaults; every option enters each row and its
identity), how to run a batch of samples under one policy (``run``), how a row compares with the
full-attention row of the same sample (``compare``) and which metrics define quality for the budget search.
Adding a task is one entry in :data:`TASKS` (and its flags in :mod:`kvkeep.cli.sweep`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import KVKeepCache
from ..generation import generate, stop_token_ids, until_stop
from ..hf import with_cache
from ..models import context_length
from .data import Dataset, Sample
from .metrics import agreement, perplexity, rouge

__all__ = [
    "TASKS",
    "PerplexityOptions",
    "RunContext",
    "SummarizationOptions",
    "Task",
    "get_task",
    "model_context",
    "prompt_ids",
    "window_starts",
]


@dataclass
class RunContext:
    """What a task's ``run`` needs: the model, its tokenizer, the data set, the task options and a memo."""

    model: torch.nn.Module
    tokenizer: object
    dataset: Dataset
    options: dict
    seed: int
    memo: dict = field(default_factory=dict)  # per-sample work shared by every configuration (tokenisation)


@dataclass(frozen=True)
class Task:
    """An evaluation task.

    Attributes:
        options: the frozen dataclass of the task's options (defaults, checks); they enter every row and its
            identity (see :meth:`check_options`).
        run: ``run(ctx, samples, policy, params) -> [row part per sample]``; a part holds ``metrics`` and
            ``prompt_tokens``, ``new_tokens``, ``kv_bytes``, ``kv_bytes_full``, ``seconds`` (a batch's wall time
            split evenly), ``truncated`` (the document's end was cut to fit the prompt limit).
        compare: ``compare(row, full_row) -> metrics`` against the full-attention row of the same sample.
        quality: metric -> ``"max"`` (higher is better) or ``"min"``; what the budget search holds.
        policy_defaults: parameters given to every policy that has them, unless set by ``--param``.
        needs_refs: the samples must have references.
        batched: ``run`` accepts several samples at once (``--batch-size``).
    """

    name: str
    description: str
    options: type
    run: Callable[[RunContext, list[Sample], str, dict], list[dict]]
    compare: Callable[[dict, dict], dict]
    quality: dict[str, str]
    policy_defaults: Callable[[dict], dict] = lambda options: {}
    needs_refs: bool = False
    batched: bool = False

    def check_options(self, values: dict) -> dict:
        """Every option of the task as a dict: ``values`` over the defaults, checked (one-line ``ValueError``)."""
        names = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown {self.name} option {', '.join(unknown)}: choose among {', '.join(names)}")
        return dataclasses.asdict(self.options(**values))


# -- shared helpers -----------------------------------------------------------------------------------
def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def model_context(model) -> int:
    """The longest sequence the model was built for (2048 when its config does not say)."""
    return context_length(model.config) or 2048


def _timed(model, fn: Callable[[], object]) -> tuple[object, float]:
    """``fn()`` and its wall time, synchronising CUDA around it."""
    cuda = model.device.type == "cuda"
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(model.device)
    return result, time.perf_counter() - start


# -- summarization ------------------------------------------------------------------------------------
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


def prompt_ids(tok, template: str, sample: Sample, limit: int) -> tuple[list[int], bool]:
    """Token ids of the sample's prompt (``template`` with ``{doc}`` and ``{query}``, in the chat template when
    the tokenizer has one) and whether the document's end was cut to fit ``limit`` tokens."""

    def encode(doc: str) -> list[int]:
        values = {"doc": doc, "query": sample.query or ""}
        text = re.sub(r"\{(doc|query)\}", lambda m: values[m.group(1)], template)
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return _encode(tok, text)
        return _encode(tok, text, special=True)

    ids = encode(sample.doc)
    if len(ids) <= limit:
        return ids, False
    doc_ids = _encode(tok, sample.doc)
    keep = len(doc_ids)
    while len(ids) > limit:
        keep -= len(ids) - limit
        if keep <= 0:
            raise ValueError(f"sample {sample.id}: the prompt without its document is longer than {limit} tokens")
        ids = encode(tok.decode(doc_ids[:keep]))
    return ids, True


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


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
    input_ids, mask = _left_pad([ids for ids, _ in prompts], tok.pad_token_id, model.device)
    cache = KVKeepCache(model, policy, max_new_tokens=opts["max_new_tokens"], **params)
    generation = {"max_new_tokens": opts["max_new_tokens"], "num_beams": opts["num_beams"], "do_sample": False}
    if opts["do_sample"]:
        torch.manual_seed(ctx.seed)
        generation["do_sample"] = True
        generation.update({k: opts[k] for k in ("temperature", "top_p") if opts[k] is not None})
    out, seconds = _timed(
        model,
        lambda: model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            **with_cache(model, cache),
            pad_token_id=tok.pad_token_id,
            **generation,
        ),
    )
    new = out[:, input_ids.shape[1] :].tolist()
    stop = stop_token_ids(model, tok)
    rows = cache.sequence_bytes()  # one per sequence and beam: a sample's beams are consecutive rows
    beams = len(rows) // len(samples)
    kv = [
        [sum(col) // beams for col in zip(*rows[i * beams : (i + 1) * beams], strict=True)] for i in range(len(samples))
    ]
    parts = []
    for s, (ids, truncated), tokens, (kv_bytes, kv_full) in zip(samples, prompts, new, kv, strict=True):
        tokens = [t for t in until_stop(tokens, stop) if t not in stop]
        text = tok.decode(tokens, skip_special_tokens=True).strip()
        parts.append(
            {
                "metrics": {f"{k}_ref": v for k, v in rouge(text, s.refs).items()},
                "prompt_tokens": len(ids),
                "new_tokens": len(tokens),
                "kv_bytes": kv_bytes,
                "kv_bytes_full": kv_full,
                "seconds": seconds / len(samples),
                "truncated": truncated,
                "output": text,
                "output_ids": tokens,
            }
        )
    return parts


def _summary_vs_full(row: dict, full: dict) -> dict:
    vs_full = {f"{k}_full": v for k, v in rouge(row["output"], full["output"]).items()}
    return {**vs_full, **agreement(row["output_ids"], full["output_ids"])}


# -- perplexity ---------------------------------------------------------------------------------------
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
            ctx.memo["ids", s.id] = _encode(ctx.tokenizer, s.doc)
        ids = ctx.memo["ids", s.id]
        try:
            starts = window_starts(len(ids), L + M, opts["windows"])
        except ValueError as err:
            raise ValueError(f"sample {s.id}: {err} (--prompt-tokens + --eval-tokens)") from None
        nll, per_window, seconds = 0.0, [], 0.0
        for start in starts:
            window = torch.tensor([ids[start : start + L + M]], device=model.device)
            cache = KVKeepCache(model, policy, **params)
            value, took = _timed(model, lambda w=window, c=cache: _window_nll(model, w, L, c))
            nll, seconds = nll + value, seconds + took
            per_window.append(perplexity(value, M))
        count = M * len(starts)
        parts.append(
            {
                "metrics": {"ppl": perplexity(nll, count), "nll": nll / count, "window_ppl": per_window},
                "prompt_tokens": L,
                "new_tokens": M,
                "kv_bytes": cache.nbytes(),  # at the end of a window (the same for every window)
                "kv_bytes_full": cache.full_nbytes(),
                "seconds": seconds,
                "truncated": False,
                "windows": len(starts),
            }
        )
    return parts


def _ppl_vs_full(row: dict, full: dict) -> dict:
    return {"ppl_vs_full": row["metrics"]["ppl"] / full["metrics"]["ppl"]}


#: Registered tasks.
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="summarization",
            description="generate a summary per sample; ROUGE vs the references and vs full attention's output",
            options=SummarizationOptions,
            run=_summarize,
            compare=_summary_vs_full,
            quality={"rouge1_ref": "max", "rouge2_ref": "max", "rougeL_ref": "max"},
            needs_refs=True,
            batched=True,
        ),
        Task(
            name="perplexity",
            description="CO2's protocol: prefill L tokens, score the next M one at a time through the cache",
            options=PerplexityOptions,
            run=_perplexity,
            compare=_ppl_vs_full,
            quality={"ppl": "min"},
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]
