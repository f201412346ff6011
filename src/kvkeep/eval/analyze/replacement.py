"""``replacement`` (CO2 Figure 4): where each decode-step eviction falls among the score-managed candidates."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ...cache import Eviction
from ...shapes import AttentionShape
from .common import PolicyRun, decode_eviction, dropped, pick
from .output import describe, new_figure, save_png, title, write_result

REPLACEMENT_BINS = 20


def _evictions(event: Eviction) -> list[tuple[int, int, int | None, int]]:
    """``(kv_head, position, index among candidates or None, candidates)`` of every token this eviction dropped."""
    before, candidate, gone = event.before, event.candidates, dropped(event)
    found = []
    for h in range(before.shape[0]):
        cands = sorted(before[h][candidate[h]].tolist())
        rank = {col: i for i, col in enumerate(cands)}
        for col in sorted(set(before[h][gone[h]].tolist())):
            found.append((h, col, rank.get(col), len(cands)))
    return found


def analyze_replacement(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    layers: Sequence[int] | None = None,
    bins: int = REPLACEMENT_BINS,
    **policy_run,
) -> dict:
    """Where each decode-step eviction falls among the score-managed candidates (CO2 Figure 4).

    Per eviction: the evicted token's index among the candidates (kept tokens not protected as sinks or
    recent window/FIFO, ordered by position) normalised to [0, 1] (1: the newest candidate, the token that
    just left the recent window; a lone candidate counts as 1). Steps that evict one token per KV head are
    ``steady``; more (CO2 cutting the cache to its budget after N steps) are ``bulk``. Evictions of tokens
    that were not candidates (a sliding window's exits) are counted in ``outside_candidates``.

    The policy and the generation: the fields of :class:`~kvkeep.eval.analyze.common.PolicyRun` as keywords
    (``policy``, ``budget``, ``params``, ``max_new_tokens``, ``stop_at_eos``).
    """
    run = PolicyRun(**policy_run)
    n_layers = AttentionShape.of(model).known().layers
    chosen = pick(layers, n_layers, "layer", range(n_layers))
    seen = _Placements(run.policy, chosen)
    gen = run.generate(model, input_ids, seen.record)
    positions = seen.positions
    steady = [p for p, k in zip(positions, seen.kinds, strict=True) if k == "steady"]
    bulk = [p for p, k in zip(positions, seen.kinds, strict=True) if k == "bulk"]
    rows = list(seen.per_layer.values())
    result = {
        "kind": "replacement",
        **describe(model, tok, gen, run),
        "layers": chosen,
        "bin_edges": [i / bins for i in range(bins + 1)],
        "counts": _histogram(positions, bins),
        "counts_steady": _histogram(steady, bins),
        "counts_bulk": _histogram(bulk, bins),
        "evictions": len(positions),
        "evicted_delta": sum(r["evicted_delta"] for r in rows),
        "outside_candidates": sum(r["outside_candidates"] for r in rows),
        "newest_candidate": sum(p == 1.0 for p in positions),
        "mean_position": sum(positions) / len(positions) if positions else None,
        "mean_position_steady": sum(steady) / len(steady) if steady else None,
        "per_layer": rows,
        "evictions_per_step": [{"step": s, "evicted": c} for s, c in sorted(seen.per_step.items())],
    }
    return write_result(Path(out), "replacement", result, lambda path: _draw(path, result))


class _Placements:
    """Where the evictions of ``policy`` on ``layers`` fall among the candidates: an eviction observer.

    ``positions``: each eviction's normalised index among the candidates, ``kinds`` its ``steady`` or ``bulk``;
    ``per_layer``: counts per layer; ``per_step``: tokens dropped per decode step.
    """

    def __init__(self, policy: str, layers: list[int]) -> None:
        self.policy = policy
        self.positions: list[float] = []
        self.kinds: list[str] = []
        self.per_layer = {i: {"layer": i, "evictions": 0, "evicted_delta": 0, "outside_candidates": 0} for i in layers}
        self.per_step: dict[int, int] = {}

    def record(self, event: Eviction) -> None:
        if not decode_eviction(event, self.policy, self.per_layer):
            return
        row = self.per_layer[event.layer_idx]
        row["evicted_delta"] += event.evicted
        if not event.evicted:
            return
        found = _evictions(event)
        bulk = len(found) > event.before.shape[0]
        for _, _, index, size in found:
            if index is None:
                row["outside_candidates"] += 1
                continue
            self.positions.append(index / (size - 1) if size > 1 else 1.0)
            self.kinds.append("bulk" if bulk else "steady")
            row["evictions"] += 1
        self.per_step[event.step] = self.per_step.get(event.step, 0) + len(found)


def _histogram(values: list[float], bins: int) -> list[int]:
    """Counts of ``values`` in [0, 1] in ``bins`` equal bins (1 in the last)."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v * bins))] += 1
    return counts


def _draw(path: Path, result: dict) -> None:
    """The evictions' positions among the candidates: steady bars with the bulk ones stacked on them."""
    figure, axes = new_figure()
    ax = axes[0, 0]
    edges = result["bin_edges"]
    width = 1 / (len(edges) - 1)
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
    ax.bar(centers, result["counts_steady"], width=width, color="#1f77b4", label="steady (one per step and head)")
    steady = result["counts_steady"]
    ax.bar(centers, result["counts_bulk"], width=width, bottom=steady, color="#ff7f0e", label="bulk (cut to budget)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("position of the evicted token among candidates (0 = oldest, 1 = just left the recent window)")
    ax.set_ylabel("evictions")
    what = f"Where evictions fall ({result['evictions']} evictions, {len(result['layers'])} layers)"
    ax.set_title(title(result, what), fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    save_png(figure, path)


def headline(result: dict) -> str:
    mean = result["mean_position"]
    return f"{result['evictions']} evictions, mean position {'n/a' if mean is None else f'{mean:.2f}'}"
