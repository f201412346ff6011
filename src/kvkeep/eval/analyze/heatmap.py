"""``heatmap`` (Keyformer Figures 14/15): full-attention maps of chosen layers and query heads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ...shapes import AttentionShape
from .common import PolicyRun, full_attention, pick
from .output import describe, new_figure, save_png, title, write_result


def analyze_heatmap(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    local: int = 16,
    stop_at_eos: bool = True,
) -> dict:
    """Full-attention maps of the chosen layers (default first, middle, last) and query heads (default 0).

    The JSON holds, per map, the mean over query rows of the probability on the first token
    (``first_token_mass``), on the query itself (``self_mass``), on the ``local`` newest tokens
    (``local_mass``), and for generated rows the mass on prompt tokens (``generation_prompt_mass``).
    """
    shape = AttentionShape.of(model).known()
    n_layers, q_heads = shape.layers, shape.heads
    layers = pick(layers, n_layers, "layer", [0, n_layers // 2, n_layers - 1])
    heads = pick(heads, q_heads, "head", [0])
    run = PolicyRun("full", max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos)
    gen = run.generate(model, input_ids)
    maps: dict[tuple[int, int], torch.Tensor] = {}
    stats: list[dict] = []

    def on_layer(layer: int, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        if layer not in layers:
            return
        n = probs.shape[-1]
        cols = torch.arange(n, device=probs.device)
        near = allowed & (cols[None, :] > cols[:, None] - local)
        for head in heads:
            maps[layer, head] = torch.where(allowed, probs[head], torch.nan).cpu()
            stats.append({"layer": layer, "head": head, **_map_stats(probs[head], near, gen.prompt_tokens)})

    full_attention(model, gen.ids, on_layer)
    stats.sort(key=lambda s: (layers.index(s["layer"]), heads.index(s["head"])))
    result = {
        "kind": "heatmap",
        **describe(model, tok, gen, run),
        "sequence_tokens": gen.ids.shape[1],
        "layers": layers,
        "heads": heads,
        "local": local,
        "maps": stats,
    }
    return write_result(Path(out), "heatmap", result, lambda path: _draw(path, result, maps))


def _map_stats(p: torch.Tensor, near: torch.Tensor, prompt: int) -> dict:
    """The masses of one map ``p [n, n]`` (query rows, key columns), ``near [n, n]`` marking the local keys."""
    gen_rows = p[prompt:, :prompt]
    return {
        "first_token_mass": float(p[:, 0].mean()),
        "self_mass": float(p.diagonal().mean()),
        "local_mass": float((p * near).sum(-1).mean()),
        "generation_prompt_mass": float(gen_rows.sum(-1).mean()) if gen_rows.numel() else None,
        "max": float(p.max()),
    }


# -- the figure ---------------------------------------------------------------------------------------------
def _draw(path: Path, result: dict, maps: dict[tuple[int, int], torch.Tensor]) -> None:
    """A grid of ``maps`` (``[n, n]``, NaN where a query may not attend): a row a layer, a column a head."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    layers, heads = result["layers"], result["heads"]
    rows, cols = len(layers), len(heads)
    figure, axes = new_figure(rows, cols, size=(0.6 + 3.2 * cols, 0.9 + 3.0 * rows))
    positive = [float(m[m > 0].min()) for m in maps.values() if bool((m > 0).any())]
    norm = LogNorm(vmin=max(1e-6, min(positive, default=1e-6)), vmax=1.0)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = None
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            ax = axes[i, j]
            image = ax.imshow(
                maps[layer, head].clamp(min=norm.vmin).numpy(), norm=norm, cmap=cmap, interpolation="nearest"
            )
            _label_map(ax, result["prompt_tokens"], layer, head, bottom=i == rows - 1, left=j == 0)
    figure.colorbar(image, ax=axes, shrink=min(0.8, 0.35 * rows), label="attention probability (log)")
    figure.suptitle(title(result, "Attention maps (dashed: end of prompt)"), fontsize=10)
    save_png(figure, path)


def _label_map(ax, prompt: int, layer: int, head: int, *, bottom: bool, left: bool) -> None:
    """One map's end-of-prompt lines, title and (on the grid's edges) axis labels."""
    for line in (ax.axvline, ax.axhline):
        line(prompt - 0.5, color="white", linewidth=0.7, linestyle="--")
    ax.set_title(f"layer {layer}, head {head}", fontsize=9)
    ax.tick_params(labelsize=7)
    if bottom:
        ax.set_xlabel("key token", fontsize=8)
    if left:
        ax.set_ylabel("query token", fontsize=8)


def headline(result: dict) -> str:
    return f"{len(result['maps'])} maps of {result['sequence_tokens']} tokens"
