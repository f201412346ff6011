"""Keyformer (Adnan et al., MLSys 2024): key tokens ranked by a Gumbel-regularised softmax score."""

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .base import ScoreSpec, ScoringPolicy, check_share, is_integer, is_real, register


@register
@dataclass
class KeyformerPolicy(ScoringPolicy):
    """Keeps ``w = recent_ratio * k`` newest tokens and the ``k - w`` key tokens of highest score.

    Score of a token: the running sum over every query (prompt rows, then each generated token) of
    ``softmax((x + g) / tau)``, with ``x`` the attention logits, ``g ~ Gumbel(0, 1)`` fresh for every
    (query, key) and ``tau`` swept linearly from ``tau_init`` to ``tau_end`` over the generation (its
    length is the cache's ``max_new_tokens``). The model's own attention output is never changed by the
    noise or the temperature.

    Args:
        recent_ratio: share of the budget kept as the recent window (paper: 0.2-0.3).
        tau_init, tau_end: temperature at the prompt and at the last generated token.
        noise: add the Gumbel noise (``False`` with ``tau`` 1 -> 1 reduces to H2O's score).
        seed: seed of the counter-based noise; the same seed gives the same scores run after run.
    """

    recent_ratio: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    noise: bool = True
    seed: int = 0

    name: ClassVar[str] = "keyformer"

    def validate(self) -> None:
        check_share("recent_ratio", self.recent_ratio)
        if not is_real(self.tau_init) or self.tau_init <= 0:
            raise ValueError(f"tau_init must be > 0, got {self.tau_init!r}")
        if not is_real(self.tau_end) or self.tau_end < self.tau_init:
            raise ValueError(
                f"tau_end ({self.tau_end!r}) must be >= tau_init ({self.tau_init!r}): the schedule only rises"
            )
        if not isinstance(self.noise, bool):
            raise ValueError(f"noise must be true or false, got {self.noise!r}")
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        super().validate()

    def recent_size(self, k: int) -> int:
        return int(self.recent_ratio * k)

    def score_spec(self) -> ScoreSpec:
        probs = super().score_spec()
        if not self.noise and self.tau_init == self.tau_end == 1:
            return probs  # exactly H2O's score
        return replace(probs, mode="tempered", noise_seed=int(self.seed) if self.noise else None)

    def temperature(self, step, total_steps):
        """``tau_init + min(step, T) * (tau_end - tau_init) / T``, elementwise; ``tau_init`` at step 0."""
        step = torch.as_tensor(step)
        if self.tau_end == self.tau_init:
            return torch.full(step.shape, float(self.tau_init), dtype=torch.float32, device=step.device)
        if total_steps is None:
            if bool((step == 0).all()):
                return torch.full(step.shape, float(self.tau_init), dtype=torch.float32, device=step.device)
            raise ValueError(
                "keyformer's temperature schedule needs the number of tokens to generate: pass "
                "max_new_tokens=N to KVKeepCache, or generate with kvkeep.generate"
            )
        total = torch.as_tensor(total_steps, device=step.device).clamp(min=1)
        sweep = torch.minimum(step, total).to(torch.float32) * (self.tau_end - self.tau_init) / total
        return sweep + self.tau_init
