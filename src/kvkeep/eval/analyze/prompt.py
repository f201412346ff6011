"""The prompt of an analysis, from plain values: a data set's sample, or a text."""

from __future__ import annotations

from ..data import Sample, load_dataset
from ..tasks import prompt_ids


def data_prompt(tok, data: str, sample: int, limit: int) -> tuple[list[int], dict]:
    """Token ids of the ``sample``-th (0-based) sample of data set ``data`` prompted as in summarization (its
    document cut to fit ``limit`` tokens), and where it came from."""
    if sample < 0:
        raise ValueError(f"--sample must be >= 0, got {sample}")
    dataset = load_dataset(data, limit=sample + 1)
    if len(dataset.samples) <= sample:
        raise ValueError(f"--data {data} has {len(dataset.samples)} samples: no sample {sample}")
    chosen = dataset.samples[sample]
    ids, truncated = prompt_ids(tok, dataset.template, chosen, limit)
    return ids, {"data": data, "sample": sample, "sample_id": chosen.id, "truncated": truncated}


def text_prompt(tok, text: str, chat: bool, limit: int) -> tuple[list[int], dict]:
    """Token ids of ``text`` (in the chat template when ``chat``; cut to ``limit`` tokens), and how."""
    if chat:
        ids, truncated = prompt_ids(tok, "{doc}", Sample("prompt", text), limit)
    else:
        ids = tok(text, verbose=False)["input_ids"]
        truncated = len(ids) > limit
        ids = ids[:limit]
    return ids, {"chat": chat, "truncated": truncated}
