"""Metrics: ROUGE F1, perplexity and token agreement with the full-attention output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

__all__ = ["ROUGE_TYPES", "agreement", "perplexity", "rouge"]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@cache
def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ValueError("ROUGE needs the rouge-score package: pip install 'kvkeep[eval]'") from None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, references: str | Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 of ``prediction`` (rouge_score, Porter stemming).

    With several references each score is the max over the references, taken per ROUGE type.  A prediction
    identical to a reference scores 1, even where both are empty (rouge_score gives 0 to empty texts).
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("ROUGE needs at least one reference")
    if prediction in refs:
        return dict.fromkeys(ROUGE_TYPES, 1.0)
    scores = [_scorer().score(ref, prediction) for ref in refs]
    return {t: max(s[t].fmeasure for s in scores) for t in ROUGE_TYPES}


def perplexity(nll_sum: float, count: int) -> float:
    """``exp(nll_sum / count)``: perplexity of ``count`` tokens whose negative log-likelihoods sum to ``nll_sum``."""
    if count <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / count)


def agreement(tokens: Sequence[int], full_tokens: Sequence[int]) -> dict:
    """How far ``tokens`` follow the full-attention output ``full_tokens``.

    Returns ``agreement``: the share of the ``len(full_tokens)`` positions where both hold the same token
    (1.0 when both are empty), and ``first_divergence``: the first index where they differ, a length
    difference included, or None when they are identical.
    """
    tokens, full_tokens = list(tokens), list(full_tokens)
    same = sum(a == b for a, b in zip(tokens, full_tokens, strict=False))
    share = same / len(full_tokens) if full_tokens else float(not tokens)
    first = next((i for i, (a, b) in enumerate(zip(tokens, full_tokens, strict=False)) if a != b), None)
    if first is None and len(tokens) != len(full_tokens):
        first = min(len(tokens), len(full_tokens))
    return {"agreement": share, "first_divergence": first}
