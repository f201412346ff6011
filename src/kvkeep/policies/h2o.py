"""H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ScoringPolicy, StepInfo, check_share, masked_softmax, register


@register
@dataclass
class H2OPolicy(ScoringPolicy):
    """Keeps ``w = recent_ratio * k`` newest tokens and the ``k - w`` with the largest accumulated attention.

    Score of a token: the running sum of the softmax probabilities it received from every query of
    every step (prompt rows and generated tokens), per layer and KV head.
    """

    recent_ratio: float = 0.5

    name: ClassVar[str] = "h2o"

    def validate(self) -> None:
        check_share("recent_ratio", self.recent_ratio)
        super().validate()

    def recent_size(self, k: int) -> int:
        return int(self.recent_ratio * k)

    def step_scores(self, logits: torch.Tensor, allowed: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return masked_softmax(logits, allowed)
