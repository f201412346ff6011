"""CO2, cumulative observation oracle (Yamazaki & Venkataraman, ES-FoMo 2024)."""

from dataclasses import dataclass, replace
from typing import ClassVar

from .base import ScoreSpec, ScoringPolicy, check_share, is_integer, is_real, register


@register
@dataclass
class CO2Policy(ScoringPolicy):
    """H2O-style accumulated attention with a measurement step, an EWMA decay and a tuned FIFO share.

    Args:
        alpha: EWMA weight of the newest attention, ``S_t = (1 - alpha) S_{t-1} + alpha A_t``;
            ``alpha = 0`` means plain accumulation (``S_t = S_{t-1} + A_t``, as H2O).
        N: generation steps during which nothing is evicted (the whole prompt is kept and scored);
            the cache is cut to the budget at step ``N``.
        rho: share of the budget kept as a FIFO of the newest tokens.

    Defaults (``alpha=0.2, N=20, rho=0.25``) are within the ranges the paper reports as good; they were
    not tuned on kvkeep's evaluation data.
    """

    alpha: float = 0.2
    N: int = 20
    rho: float = 0.25

    name: ClassVar[str] = "co2"

    def validate(self) -> None:
        if not is_real(self.alpha) or self.alpha < 0 or self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1] (0 = plain accumulation), got {self.alpha!r}")
        if not is_integer(self.N) or self.N < 0:
            raise ValueError(f"N (measurement steps) must be an int >= 0, got {self.N!r}")
        check_share("rho", self.rho)
        super().validate()

    def recent_size(self, k: int) -> int:
        return int(self.rho * k)

    def evict_after(self) -> int:
        return self.N

    def score_spec(self) -> ScoreSpec:
        return replace(super().score_spec(), decay=float(self.alpha))
