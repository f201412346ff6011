"""Attention and cache analyses of one prompt; each writes ``OUT/KIND.json`` and ``OUT/KIND.png``.

    kvkeep analyze sparsity --data cnndm --sample 0 --out runs/analysis
    kvkeep analyze heatmap --prompt-file article.txt --chat --layers 0,15,29 --heads 0,4 --out runs/analysis
    kvkeep analyze cached --data cnndm --policy co2 --budget 0.5 --gamma 0.01 --out runs/analysis
    kvkeep analyze replacement --data cnndm --policy h2o --budget 0.5 --out runs/analysis
    kvkeep analyze scores --data cnndm --policy keyformer --budget 0.5 --out runs/analysis

Kinds, one module each (a function ``analyze_<kind>(model, tok, input_ids, ..., out=DIR) -> dict``); the
command line is :mod:`kvkeep.cli.analyze`:

- ``sparsity`` (Keyformer Figure 11): share of full-attention probabilities below p% of their row's maximum
  (p in 0.1, 0.5, 1, 5, 10), per layer, mean over heads and query rows, over prompt + generation.
- ``heatmap`` (Keyformer Figures 14/15): full-attention maps (query rows x key columns, log colour scale) of
  chosen layers and query heads over prompt + generation.
- ``cached`` (CO2 Figures 3 and 12): at each decode step, layer and KV head, every token so far is
  *activated* (its full-attention probability, the mean over the query heads of that KV head, is above
  ``gamma`` x the layer's largest such probability at that step) or not, and *kept* (held by the policy's
  cache at that step) or not; counts per layer and a tokens x steps map of one layer and KV head.
- ``replacement`` (CO2 Figure 4): where each decode-step eviction falls among the score-managed candidates
  (the kept tokens that neither the recent window/FIFO nor the sinks protect, ordered by position;
  0 = the oldest candidate, 1 = the newest, the token that just left the recent window).
- ``scores``: the policy's accumulated scores at a few decode steps, and the scores of the evicted tokens
  against the candidates kept at the same evictions.

How it is measured, through public hooks only: generation is kvkeep's decode loop (greedy) through a
:class:`~kvkeep.cache.KVKeepCache` built with an ``observer``, which every eviction hands an
:class:`~kvkeep.cache.Eviction` (the positions and scores just before it are what that step attended to and
ranked; the positions after are what it kept).  Full-attention probabilities come from one forward of the whole
final sequence (prompt + generated tokens, no cache) inside :func:`kvkeep.attention.probe`, which hands each
layer's softmax probabilities to the analysis, one layer at a time. Sparsity and heat maps generate with full
attention; ``cached`` compares the policy's cache with full attention over the tokens the policy generated.
:mod:`.common` holds both hooks and the model facts; :mod:`.output` the JSON, the PNG and the plotting helpers.

Memory: a layer's probabilities are ``heads x n x n`` float32 (n = prompt + new tokens), held one layer at a
time (heat maps keep the chosen maps). The command line caps the prompt at ``--max-prompt-tokens`` (default
1024); the Python functions take the prompt as given. Batch size 1 only.
"""

from __future__ import annotations

from collections.abc import Callable

from . import cached, heatmap, replacement, scores, sparsity
from .cached import CATEGORIES, analyze_cached
from .common import full_attention
from .heatmap import analyze_heatmap
from .output import update_result
from .prompt import data_prompt, text_prompt
from .replacement import analyze_replacement
from .scores import analyze_scores
from .sparsity import THRESHOLDS, analyze_sparsity

__all__ = [
    "CATEGORIES",
    "KINDS",
    "POLICY_KINDS",
    "THRESHOLDS",
    "analyze_cached",
    "analyze_heatmap",
    "analyze_replacement",
    "analyze_scores",
    "analyze_sparsity",
    "data_prompt",
    "full_attention",
    "headline",
    "text_prompt",
    "update_result",
]

#: The analyses by name, in the order the command line lists them.
KINDS: dict[str, Callable[..., dict]] = {
    "sparsity": analyze_sparsity,
    "heatmap": analyze_heatmap,
    "cached": analyze_cached,
    "replacement": analyze_replacement,
    "scores": analyze_scores,
}
#: The analyses that run a policy (the others generate with full attention).
POLICY_KINDS = ("cached", "replacement", "scores")
_HEADLINES = {
    "sparsity": sparsity.headline,
    "heatmap": heatmap.headline,
    "cached": cached.headline,
    "replacement": replacement.headline,
    "scores": scores.headline,
}


def headline(result: dict) -> str:
    """One line of the main numbers of an analysis' result."""
    return _HEADLINES[result["kind"]](result)
