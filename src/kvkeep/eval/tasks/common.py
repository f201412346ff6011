"""What every task shares: the :class:`Task` contract, the :class:`RunContext` it runs in, prompts and the
batched generation through a :class:`~kvkeep.cache.KVKeepCache`."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...cache import KVKeepCache
from ...generation import stop_token_ids, until_stop
from ...hf import with_cache
from ...models import context_length
from ..data import Dataset, Sample

__all__ = [
    "RunContext",
    "Task",
    "chat_parts",
    "encode",
    "generate_batch",
    "generation_fields",
    "model_context",
    "prompt_ids",
    "timed",
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


def encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def model_context(model) -> int:
    """The longest sequence the model was built for (2048 when its config does not say)."""
    return context_length(model.config) or 2048


def timed(model, fn: Callable[[], object]) -> tuple[object, float]:
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


def prompt_ids(tok, template: str, sample: Sample, limit: int) -> tuple[list[int], bool]:
    """Token ids of the sample's prompt (``template`` with ``{doc}`` and ``{query}``, in the chat template when
    the tokenizer has one) and whether the document's end was cut to fit ``limit`` tokens."""

    def encode_doc(doc: str) -> list[int]:
        values = {"doc": doc, "query": sample.query or ""}
        text = re.sub(r"\{(doc|query)\}", lambda m: values[m.group(1)], template)
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return encode(tok, text)
        return encode(tok, text, special=True)

    ids = encode_doc(sample.doc)
    if len(ids) <= limit:
        return ids, False
    doc_ids = encode(tok, sample.doc)
    keep = len(doc_ids)
    while len(ids) > limit:
        keep -= len(ids) - limit
        if keep <= 0:
            raise ValueError(f"sample {sample.id}: the prompt without its document is longer than {limit} tokens")
        ids = encode_doc(tok.decode(doc_ids[:keep]))
    return ids, True


def chat_parts(tok) -> tuple[list[int], list[int]]:
    """Token ids before and after a user message in the tokenizer's chat template (with the assistant's turn
    opened); without a chat template, the ids a plain encoding starts with (BOS) and nothing."""
    if not getattr(tok, "chat_template", None):
        return encode(tok, "", special=True), []
    marker = "\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    head, tail = text.split(marker)
    return encode(tok, head), encode(tok, tail)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate_batch(
    ctx: RunContext, prompts: list[list[int]], policy: str, params: dict, generation: dict
) -> tuple[list[dict], float]:
    """Generate for every prompt (one left-padded ``model.generate`` call through a fresh kvkeep cache).

    ``generation``: ``model.generate``'s decoding arguments, ``max_new_tokens`` included.  Returns, per prompt,
    ``tokens`` (up to the stop token, which is dropped), ``text``, ``kv_bytes`` (held at the end),
    ``kv_bytes_peak`` (the most held), ``kv_bytes_full`` (a sample's beams averaged), ``floored`` (the policy's
    floor set the budget), and the wall time of the call.
    """
    model, tok = ctx.model, ctx.tokenizer
    input_ids, mask = _left_pad(prompts, tok.pad_token_id, model.device)
    cache = KVKeepCache(model, policy, max_new_tokens=generation["max_new_tokens"], **params)
    out, seconds = timed(
        model,
        lambda: model.generate(
            input_ids=input_ids, attention_mask=mask, **with_cache(model, cache), pad_token_id=tok.pad_token_id,
            **generation,
        ),
    )  # fmt: skip
    new = out[:, input_ids.shape[1] :].tolist()
    stop = stop_token_ids(model, tok)
    # One per sequence and beam: a sample's beams are consecutive rows.
    rows = [(*kept, peak) for kept, peak in zip(cache.sequence_bytes(), cache.peak_sequence_bytes(), strict=True)]
    beams = len(rows) // len(prompts)
    floored = cache.floored()
    results = []
    for i, tokens in enumerate(new):
        kv_bytes, kv_full, kv_peak = (sum(c) // beams for c in zip(*rows[i * beams : (i + 1) * beams], strict=True))
        tokens = [t for t in until_stop(tokens, stop) if t not in stop]
        text = tok.decode(tokens, skip_special_tokens=True).strip()
        results.append(
            {"tokens": tokens, "text": text, "kv_bytes": kv_bytes, "kv_bytes_peak": kv_peak,
             "kv_bytes_full": kv_full, "floored": floored[i * beams]}
        )  # fmt: skip
    return results, seconds


def generation_fields(out: dict, prompt: list[int], seconds: float, truncated: bool = False) -> dict:
    """The fields of a generating task's row for one output of :func:`generate_batch`."""
    return {
        "prompt_tokens": len(prompt),
        "new_tokens": len(out["tokens"]),
        "kv_bytes": out["kv_bytes"],
        "kv_bytes_peak": out["kv_bytes_peak"],
        "kv_bytes_full": out["kv_bytes_full"],
        "floored": out["floored"],
        "seconds": seconds,
        "truncated": truncated,
        "output": out["text"],
        "output_ids": out["tokens"],
    }
