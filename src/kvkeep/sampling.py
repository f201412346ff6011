"""Choosing the next token: greedy, or sampled (temperature, top-p) from counter-based noise.

Sampling draws Gumbel noise from a hash of (the request's seed, its step, the vocabulary id), the same
construction as Keyformer's noise (:mod:`kvkeep.policies.noise`): a request gets the same tokens for the
same seed whether it runs alone or batched with others, and nothing reads a global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .policies.base import is_integer, is_real
from .policies.noise import M32, mix32, uniform


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens.

    Args:
        temperature: 0 for greedy decoding; > 0 divides the logits before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to ``top_p``.
        seed: seed of the request's noise (the same seed gives the same tokens); a 64-bit integer, of which
            the noise hashes the low 32 bits, as Keyformer's does.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {self.top_p!r}")
        if not is_integer(self.seed) or not -(1 << 63) <= self.seed < 1 << 63:
            raise ValueError(f"seed must be an integer that fits in 64 bits, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """The next token of each row.

    Args:
        logits: ``[rows, vocab]``.
        temperature, top_p: ``[rows]`` float32 (temperature 0: greedy).
        seed, step: ``[rows]`` int64, the request's seed and the index of the token being chosen.
    Returns:
        ``[rows]`` int64.
    """
    greedy = logits.argmax(-1)
    scaled = logits.float() / temperature.clamp(min=1e-6)[:, None]
    order = scaled.argsort(-1, descending=True)
    sorted_logits = scaled.gather(-1, order)
    probs = torch.softmax(sorted_logits, -1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], -math.inf)  # the most likely always stays
    h = mix32(mix32(mix32(seed[:, None] & M32) ^ (step[:, None] & M32)) ^ order)
    noisy = sorted_logits - torch.log(-torch.log(uniform(h)))
    chosen = order.gather(-1, noisy.argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, chosen, greedy)
