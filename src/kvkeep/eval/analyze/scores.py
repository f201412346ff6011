"""``scores``: the distribution of a policy's accumulated scores, and of the evicted tokens' against the kept."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ...cache import Eviction
from ...policies import POLICIES, ScoringPolicy
from ...shapes import AttentionShape
from .common import PolicyRun, decode_eviction, dropped, pick
from .output import describe, new_figure, save_png, title, write_result

SCORE_BINS = 40


def _summary(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"count": 0}
    q = torch.quantile(values.double(), torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64))
    return {
        "count": int(values.numel()),
        "zeros": int((values <= 0).sum()),
        "mean": float(values.mean()),
        "quantiles": dict(zip(("p1", "p10", "p50", "p90", "p99"), q.tolist(), strict=True)),
    }


def analyze_scores(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    bins: int = SCORE_BINS,
    **policy_run,
) -> dict:
    """The policy's accumulated scores: their distribution at a few decode steps, and evicted vs kept.

    ``snapshots``: the scores of every cached token (pooled over the chosen layers and KV heads) at the
    given decode steps (default: four, evenly spaced, the last included), just before that step's eviction.
    ``evicted`` / ``kept``: at every decode-step eviction, the scores of the tokens dropped and of the
    candidates kept (protected sinks and recent tokens excluded). ``per_step``: their means per step.
    Histograms share log-spaced ``bin_edges``; scores <= 0 are counted in ``zeros`` only.

    The policy and the generation: the fields of :class:`~kvkeep.eval.analyze.common.PolicyRun` as keywords
    (``policy``, ``budget``, ``params``, ``max_new_tokens``, ``stop_at_eos``).
    """
    run = PolicyRun(**policy_run)
    if run.policy not in POLICIES or not issubclass(POLICIES[run.policy], ScoringPolicy):
        scoring = [name for name, cls in POLICIES.items() if issubclass(cls, ScoringPolicy)]
        raise ValueError(f"policy '{run.policy}' keeps no scores: use one of {', '.join(scoring)}")
    n_layers = AttentionShape.of(model).known().layers
    chosen = set(pick(layers, n_layers, "layer", range(n_layers)))
    run.require_decode_step("scores")
    seen = _Scores(run.policy, chosen, _snapshot_steps(steps, run.max_new_tokens - 1))
    gen = run.generate(model, input_ids, seen.record)
    snapshots = {s: torch.cat(v) for s, v in seen.snapshots.items() if v}
    evicted = torch.cat(seen.evicted) if seen.evicted else torch.zeros(0)
    kept = torch.cat(seen.kept) if seen.kept else torch.zeros(0)
    edges = _log_edges(torch.cat([evicted, kept, *snapshots.values()]), bins)
    result = {
        "kind": "scores",
        **describe(model, tok, gen, run),
        "layers": sorted(chosen),
        "bin_edges": edges.tolist(),
        "snapshots": [{"step": s, **_distribution(v, edges)} for s, v in sorted(snapshots.items())],
        "evicted": _distribution(evicted, edges),
        "kept": _distribution(kept, edges),
        "evicted_below_kept_median": (
            float((evicted < kept.median()).float().mean()) if evicted.numel() and kept.numel() else None
        ),
        "per_step": [_step_row(s, ev, kp) for s, (ev, kp) in sorted(seen.per_step.items())],
    }
    return write_result(Path(out), "scores", result, lambda path: _draw(path, result))


def _snapshot_steps(steps: Sequence[int] | None, total_steps: int) -> list[int]:
    """The decode steps to snapshot: ``steps`` sorted, or four evenly spaced up to ``total_steps``."""
    wanted = sorted(set(steps)) if steps else sorted({max(1, round(total_steps * i / 4)) for i in range(1, 5)})
    if any(s < 1 for s in wanted):
        raise ValueError(f"steps are decode steps >= 1, got {wanted}")
    return wanted


class _Scores:
    """The scores :func:`analyze_scores` collects: an eviction observer.

    ``snapshots``: per wanted step, the ``[cached]`` scores of each chosen layer; ``evicted`` / ``kept``: per
    eviction, the scores of the candidates dropped and kept; ``per_step``: per step, both concatenated.
    """

    def __init__(self, policy: str, layers: set[int], steps: list[int]) -> None:
        self.policy, self.layers = policy, layers
        self.snapshots: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
        self.evicted: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.per_step: dict[int, list[torch.Tensor]] = {}

    def record(self, event: Eviction) -> None:
        scores = event.scores
        if not decode_eviction(event, self.policy, self.layers) or scores is None:
            return
        if event.step in self.snapshots:
            self.snapshots[event.step].append(scores[event.before >= 0].float().cpu())
        if not event.evicted:
            return
        candidate = event.candidates
        gone = candidate & dropped(event)
        ev, kp = scores[gone].float().cpu(), scores[candidate & ~gone].float().cpu()
        self.evicted.append(ev)
        self.kept.append(kp)
        step = self.per_step.setdefault(event.step, [torch.zeros(0), torch.zeros(0)])
        step[0], step[1] = torch.cat([step[0], ev]), torch.cat([step[1], kp])


def _log_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """``[bins + 1]`` float64 log-spaced edges over the positive ``values`` (1e-6 to 1 when there are none)."""
    positive = values[values > 0]
    if not positive.numel():
        return torch.logspace(-6, 0, bins + 1, dtype=torch.float64)
    low, high = float(positive.min()), float(positive.max())
    high = high * 1.0001 if high > low else low * 10
    return torch.logspace(math.log10(low), math.log10(high), bins + 1, dtype=torch.float64)


def _distribution(values: torch.Tensor, edges: torch.Tensor) -> dict:
    """:func:`_summary` of ``values [count]`` and their histogram ``hist`` over ``edges``."""
    return {**_summary(values), "hist": _histogram(values, edges)}


def _histogram(values: torch.Tensor, edges: torch.Tensor) -> list[int]:
    """Counts of the positive ``values`` in the bins of ``edges`` (values outside counted at the ends)."""
    bins = edges.numel() - 1
    values = values[values > 0].double()
    if not values.numel():
        return [0] * bins
    return torch.histogram(values.clamp(float(edges[0]), float(edges[-1])), bins=edges).hist.long().tolist()


def _step_row(step: int, evicted: torch.Tensor, kept: torch.Tensor) -> dict:
    return {
        "step": step,
        "evicted": int(evicted.numel()),
        "evicted_mean": float(evicted.mean()) if evicted.numel() else None,
        "kept_mean": float(kept.mean()) if kept.numel() else None,
    }


# -- the figure ---------------------------------------------------------------------------------------------
def _draw(path: Path, result: dict) -> None:
    """The snapshots' distributions (left) and the evicted against the kept candidates (right)."""
    figure, axes = new_figure(1, 2, size=(13, 4.8))
    edges = result["bin_edges"]
    ax = axes[0, 0]
    for snap in result["snapshots"]:
        total = max(1, sum(snap["hist"]))
        ax.stairs([c / total for c in snap["hist"]], edges, label=f"step {snap['step']} (n={snap['count']})")
    _log_panel(ax, "accumulated score", "share of cached tokens", "Scores of the cached tokens at decode steps")
    ax = axes[0, 1]
    for name, color in (("kept", "#1f77b4"), ("evicted", "#d62728")):
        part = result[name]
        total = max(1, sum(part["hist"]))
        label = f"{'evicted' if name == 'evicted' else 'kept candidates'} (n={part['count']})"
        ax.stairs([c / total for c in part["hist"]], edges, label=label, color=color, fill=name == "evicted", alpha=0.6)
    what = "Evicted tokens vs candidates kept at the same evictions"
    _log_panel(ax, "accumulated score at eviction time", "share", what)
    figure.suptitle(title(result, "Score distributions"), fontsize=10)
    save_png(figure, path)


def _log_panel(ax, xlabel: str, ylabel: str, what: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(what, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def headline(result: dict) -> str:
    return f"{result['evicted'].get('count', 0)} evicted scores, {len(result['snapshots'])} snapshots"
