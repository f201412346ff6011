"""H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023)."""

from dataclasses import dataclass
from typing import ClassVar

from .base import ScoringPolicy, check_share, register


@register
@dataclass
class H2OPolicy(ScoringPolicy):
    """Keeps ``w = recent_ratio * k`` newest tokens and the ``k - w`` with the largest accumulated attention.

    Score of a token: the running sum of the softmax probabilities it received from every query of
    every step (prompt rows and generated tokens), per layer and KV head.  Any attention implementation
    works: kvkeep computes the probabilities in its own attention entry.
    """

    recent_ratio: float = 0.5

    name: ClassVar[str] = "h2o"

    def validate(self) -> None:
        check_share("recent_ratio", self.recent_ratio)
        super().validate()

    def recent_size(self, k: int) -> int:
        return int(self.recent_ratio * k)
