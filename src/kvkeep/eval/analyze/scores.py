"""``scores``: the distribution of a policy's accumulated scores, and of the evicted tokens' against the kept."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ...cache import Eviction
from ...policies import POLICIES, ScoringPolicy
from .common import PolicyRun, num_layers, pick
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
    n_layers = num_layers(model)
    chosen = set(pick(layers, n_layers, "layer", range(n_layers)))
    total_steps = run.max_new_tokens - 1
    if total_steps < 1:
        raise ValueError("scores needs --max-new-tokens >= 2 (one decode step at least)")
    wanted = sorted(set(steps)) if steps else sorted({max(1, round(total_steps * i / 4)) for i in range(1, 5)})
    if any(s < 1 for s in wanted):
        raise ValueError(f"steps are decode steps >= 1, got {wanted}")
    snaps: dict[int, list[torch.Tensor]] = {s: [] for s in wanted}
    evicted_scores: list[torch.Tensor] = []
    kept_scores: list[torch.Tensor] = []
    per_step: dict[int, list[torch.Tensor]] = {}

    def on_evict(event: Eviction) -> None:
        before, scores, after = event.before, event.scores, event.after
        if event.step < 1 or event.layer_idx not in chosen or scores is None or event.policy != run.policy:
            return
        if event.step in snaps:
            snaps[event.step].append(scores[before >= 0].float().cpu())
        if not event.evicted:
            return
        candidate = event.candidates
        gone = torch.zeros_like(candidate)
        for h in range(before.shape[0]):
            gone[h] = candidate[h] & ~torch.isin(before[h], after[h][after[h] >= 0])
        ev, kp = scores[gone].float().cpu(), scores[candidate & ~gone].float().cpu()
        evicted_scores.append(ev)
        kept_scores.append(kp)
        step = per_step.setdefault(event.step, [torch.zeros(0), torch.zeros(0)])
        step[0], step[1] = torch.cat([step[0], ev]), torch.cat([step[1], kp])

    gen = run.generate(model, input_ids, on_evict)
    snapshots = {s: torch.cat(v) for s, v in snaps.items() if v}
    evicted = torch.cat(evicted_scores) if evicted_scores else torch.zeros(0)
    kept = torch.cat(kept_scores) if kept_scores else torch.zeros(0)
    everything = torch.cat([evicted, kept, *snapshots.values()])
    positive = everything[everything > 0]
    if positive.numel():
        low, high = float(positive.min()), float(positive.max())
        high = high * 1.0001 if high > low else low * 10
        edges = torch.logspace(math.log10(low), math.log10(high), bins + 1, dtype=torch.float64)
    else:
        edges = torch.logspace(-6, 0, bins + 1, dtype=torch.float64)

    def histogram(values: torch.Tensor) -> list[int]:
        values = values[values > 0].double()
        if not values.numel():
            return [0] * bins
        return torch.histogram(values.clamp(float(edges[0]), float(edges[-1])), bins=edges).hist.long().tolist()

    result = {
        "kind": "scores",
        **describe(model, tok, gen, run),
        "layers": sorted(chosen),
        "bin_edges": edges.tolist(),
        "snapshots": [{"step": s, **_summary(v), "hist": histogram(v)} for s, v in sorted(snapshots.items())],
        "evicted": {**_summary(evicted), "hist": histogram(evicted)},
        "kept": {**_summary(kept), "hist": histogram(kept)},
        "evicted_below_kept_median": (
            float((evicted < kept.median()).float().mean()) if evicted.numel() and kept.numel() else None
        ),
        "per_step": [
            {
                "step": s,
                "evicted": int(ev.numel()),
                "evicted_mean": float(ev.mean()) if ev.numel() else None,
                "kept_mean": float(kp.mean()) if kp.numel() else None,
            }
            for s, (ev, kp) in sorted(per_step.items())
        ],
    }

    def draw(path: Path) -> None:
        figure, axes = new_figure(1, 2, size=(13, 4.8))
        edge_list = edges.tolist()
        ax = axes[0, 0]
        for snap in result["snapshots"]:
            total = max(1, sum(snap["hist"]))
            ax.stairs([c / total for c in snap["hist"]], edge_list, label=f"step {snap['step']} (n={snap['count']})")
        _log_panel(ax, "accumulated score", "share of cached tokens", "Scores of the cached tokens at decode steps")
        ax = axes[0, 1]
        for name, color in (("kept", "#1f77b4"), ("evicted", "#d62728")):
            part = result[name]
            total = max(1, sum(part["hist"]))
            label = f"{'evicted' if name == 'evicted' else 'kept candidates'} (n={part['count']})"
            ax.stairs(
                [c / total for c in part["hist"]],
                edge_list,
                label=label,
                color=color,
                fill=name == "evicted",
                alpha=0.6,
            )
        what = "Evicted tokens vs candidates kept at the same evictions"
        _log_panel(ax, "accumulated score at eviction time", "share", what)
        figure.suptitle(title(result, "Score distributions"), fontsize=10)
        save_png(figure, path)

    return write_result(Path(out), "scores", result, draw)


def _log_panel(ax, xlabel: str, ylabel: str, what: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(what, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def headline(result: dict) -> str:
    return f"{result['evicted'].get('count', 0)} evicted scores, {len(result['snapshots'])} snapshots"
