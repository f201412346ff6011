"""Confidence intervals: the percentile bootstrap of a mean over samples, with a fixed generator.

    bootstrap_ci([0.2, 0.4, 0.9])               # (low, high), 95%, 2000 resamples, seed 0
    paired_bootstrap_ci(tuned, default)         # the CI of mean(tuned - default) over the same samples

Resampling draws ``n`` indices with replacement per resample (``numpy.random.default_rng(seed).integers``,
as ``scipy.stats.bootstrap`` does), and the bounds are the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
percentiles (numpy's linear interpolation) of the resampled means.  The same values give the same interval
on every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CONFIDENCE", "RESAMPLES", "bootstrap_ci", "fmt_ci", "paired_bootstrap_ci"]

CONFIDENCE = 0.95
RESAMPLES = 2000


def bootstrap_ci(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float] | None:
    """The percentile-bootstrap interval of the mean of ``values`` (None when there are none)."""
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence}, {resamples}")
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return None
    index = np.random.default_rng(seed).integers(0, data.size, (resamples, data.size))
    means = data[index].mean(axis=-1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(
    values: Sequence[float], baseline: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES
) -> tuple[float, float] | None:
    """The interval of ``mean(values - baseline)``, the two measured on the same samples in the same order."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need equal lengths, got {len(values)} and {len(baseline)}")
    return bootstrap_ci(np.subtract(values, baseline), confidence, resamples)


def fmt_ci(ci: tuple[float, float] | None, fmt=lambda v: f"{v:.3f}") -> str:
    """``"[low, high]"`` with each bound formatted by ``fmt``; ``"–"`` without an interval."""
    return "–" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"
