"""Confidence intervals: the bootstrap against hand computations and scipy, and in ``kvkeep report``."""

from __future__ import annotations

import numpy as np
import pytest
from test_eval_report import grid_rows, read_csv, run_report, write_run

from kvkeep.eval.stats import bootstrap_ci, fmt_ci, paired_bootstrap_ci


def test_bootstrap_of_a_coin_is_the_binomial_quantiles() -> None:
    """Five ones and five zeros: a resample's mean is Binomial(10, 1/2) / 10, whose 2.5% and 97.5% quantiles are
    0.2 and 0.8 (P(X <= 1) = 0.011 < 0.025 < P(X <= 2) = 0.055, and symmetrically), with wide margins at 10^4
    resamples: the percentiles fall inside the runs of 0.2 and of 0.8."""
    assert bootstrap_ci([1] * 5 + [0] * 5, resamples=10_000) == (0.2, 0.8)
    assert bootstrap_ci([1] * 5 + [0] * 5, confidence=0.5, resamples=10_000) == (0.4, 0.6)  # P(X<=3)=.17, P(X<=4)=.38


def test_bootstrap_hand_computed_resamples() -> None:
    """Two values and two resamples: the draws of default_rng(0) decide, and the bounds interpolate linearly."""
    draws = np.random.default_rng(0).integers(0, 2, (2, 2))
    means = np.array([0.0, 1.0])[draws].mean(axis=-1)
    low, high = sorted(means)
    width = high - low
    assert bootstrap_ci([0.0, 1.0], resamples=2) == pytest.approx((low + 0.025 * width, high - 0.025 * width))


def test_bootstrap_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    values = [0.1, 0.5, 0.35, 0.9, 0.2, 0.7, 0.44]
    ours = bootstrap_ci(values, resamples=1000, seed=3)
    theirs = stats.bootstrap(
        (np.array(values),), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(3)
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=1e-12)


def test_bootstrap_edges() -> None:
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert bootstrap_ci([0.4] * 7) == pytest.approx((0.4, 0.4))
    assert bootstrap_ci([3.0, 1.0, 2.0]) == bootstrap_ci([3.0, 1.0, 2.0])  # fixed seed
    assert paired_bootstrap_ci([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0], confidence=1.5)
    assert fmt_ci((0.1234, 0.5)) == "[0.123, 0.500]" and fmt_ci(None) == "–"


def test_report_tables_and_csv_carry_the_intervals(tmp_path, capsys) -> None:
    run = write_run(tmp_path / "grid", grid_rows())
    run_report(capsys, run, "--metric", "rouge1_ref")
    md = (run / "report.md").read_text()
    # window at 0.2: samples 0.17, 0.19, 0.21, 0.23 (rouge_rows' offsets around 0.20)
    low, high = bootstrap_ci([0.17, 0.19, 0.21, 0.23])
    lines = md.splitlines()
    window = lines.index("| window | 0.2000 | 0.3000 | 0.3500 |")
    assert lines[window + 1].startswith(f"| (95% CI) | [{low:.4f}, {high:.4f}] | ")
    assert "95% confidence interval (percentile bootstrap over samples" in md
    summary = {(r["policy"], r["budget"]): r for r in read_csv(run / "summary.csv")}
    assert float(summary[("window", "0.2")]["rouge1_ref_ci_low"]) == pytest.approx(low)
    assert float(summary[("window", "0.2")]["rouge1_ref_ci_high"]) == pytest.approx(high)
    assert summary[("full", "")]["first_divergence_ci_low"] == ""  # no values, no interval
