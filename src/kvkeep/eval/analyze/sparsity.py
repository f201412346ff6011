"""``sparsity`` (Keyformer Figure 11): how much of full attention is near zero, per layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .common import PolicyRun, full_attention
from .output import describe, integer_ticks, new_figure, pct, save_png, title, write_result

#: Thresholds of ``sparsity``, relative to each row's largest probability (Keyformer Figure 11).
THRESHOLDS = (0.001, 0.005, 0.01, 0.05, 0.1)


def analyze_sparsity(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    max_new_tokens: int = 64,
    thresholds: Sequence[float] = THRESHOLDS,
    stop_at_eos: bool = True,
) -> dict:
    """Share of full-attention probabilities below ``t`` x their row's maximum, per layer (Keyformer Figure 11).

    Generates with full attention, then per layer: for each query row (prompt + generation), the share of
    the keys it may attend whose probability is below ``t`` x the row's largest; averaged over heads and
    rows (``share_below``) and pooled over every (head, row, key) entry (``pooled_below``).
    """
    thresholds = sorted(float(t) for t in thresholds)
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"thresholds must be in (0, 1], got {thresholds}")
    run = PolicyRun("full", max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos)
    gen = run.generate(model, input_ids)
    per_layer: list[dict] = []

    def on_layer(layer: int, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        per_layer.append({"layer": layer, **_below(probs, allowed, thresholds)})

    full_attention(model, gen.ids, on_layer)
    result = {
        "kind": "sparsity",
        **describe(model, tok, gen, run),
        "sequence_tokens": gen.ids.shape[1],
        "thresholds": thresholds,
        "threshold_labels": [pct(t) for t in thresholds],
        "per_layer": per_layer,
        "mean_share_below": [
            sum(r["share_below"][i] for r in per_layer) / len(per_layer) for i in range(len(thresholds))
        ],
    }
    return write_result(Path(out), "sparsity", result, lambda path: _draw(path, result))


def _below(probs: torch.Tensor, allowed: torch.Tensor, thresholds: list[float]) -> dict:
    """One layer's ``share_below`` and ``pooled_below`` at each threshold (``probs [H, n, n]``, ``allowed [n, n]``)."""
    row_max = probs.amax(-1, keepdim=True)
    row_len = allowed.sum(-1).clamp(min=1).float()  # [n]
    share, pooled = [], []
    for t in thresholds:
        below = (probs < t * row_max) & allowed  # [H, n, n]
        counts = below.sum(-1).float()  # [H, n]
        share.append(float((counts / row_len).mean()))
        pooled.append(float(counts.sum() / (row_len.sum() * probs.shape[0])))
    return {"share_below": share, "pooled_below": pooled}


def _draw(path: Path, result: dict) -> None:
    """The share below each threshold, per layer: a line a threshold."""
    figure, axes = new_figure()
    ax = axes[0, 0]
    per_layer = result["per_layer"]
    layers = [r["layer"] for r in per_layer]
    for i, t in enumerate(result["thresholds"]):
        ax.plot(layers, [100 * r["share_below"][i] for r in per_layer], marker="o", markersize=3, label=f"< {pct(t)}")
    integer_ticks(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention scores below threshold (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title(result, "Share of attention scores below p% of the row maximum"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="p (of row max)", title_fontsize="small")
    save_png(figure, path)


def headline(result: dict) -> str:
    pairs = zip(result["threshold_labels"], result["mean_share_below"], strict=True)
    return "mean share below " + ", ".join(f"{label}: {100 * v:.1f}%" for label, v in pairs)
