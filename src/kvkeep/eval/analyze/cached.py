"""``cached`` (CO2 Figures 3 and 12): the tokens full attention activates against the tokens a policy keeps."""

from __future__ import annotations

from pathlib import Path

import torch

from ...cache import Eviction
from ...shapes import AttentionShape
from .common import Generation, PolicyRun, as_ids, full_attention, pick
from .output import describe, integer_ticks, new_figure, save_png, title, write_result

#: ``cached`` categories, in the order of the counts and the colours.
CATEGORIES = ("activated_kept", "activated_evicted", "kept_inactive", "inactive_evicted")
CATEGORY_LABELS = {
    "activated_kept": "activated, kept",
    "activated_evicted": "activated, evicted",
    "kept_inactive": "kept, not activated",
    "inactive_evicted": "evicted, not activated",
}
CATEGORY_COLORS = {
    "activated_kept": "#2ca02c",
    "activated_evicted": "#d62728",
    "kept_inactive": "#8fb8de",
    "inactive_evicted": "#d9d9d9",
}


def analyze_cached(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    gamma: float = 0.01,
    layer: int | None = None,
    head: int = 0,
    **policy_run,
) -> dict:
    """Activated vs kept tokens per layer (CO2 Figure 12) and per step for one layer and KV head (Figure 3).

    Unit: (decode step, layer, KV head, token so far). A token is *activated* when its full-attention
    probability from the step's query (mean over the KV head's query heads) exceeds ``gamma`` x the
    largest such probability in the layer at that step; *kept* when the policy's cache held it at that
    step (the query attended to it). ``layer``/``head``: the per-step view (default: middle layer, KV head 0).

    The policy and the generation: the fields of :class:`~kvkeep.eval.analyze.common.PolicyRun` as keywords
    (``policy``, ``budget``, ``params``, ``max_new_tokens``, ``stop_at_eos``).
    """
    run = PolicyRun(**policy_run)
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    run.require_decode_step("cached")
    n_layers = AttentionShape.of(model).known().layers
    view_layer = pick(None if layer is None else [layer], n_layers, "layer", [n_layers // 2])[0]
    kept = _KeptMasks(n_layers, as_ids(input_ids, model).shape[1] + run.max_new_tokens)
    gen = run.generate(model, input_ids, kept.record)
    if gen.steps < 1:
        raise ValueError("the generation stopped at its first token: no decode step to analyse")
    kv_heads = gen.cache.layers[0].positions.shape[1]
    view_head = pick([head], kv_heads, "KV head", [0])[0]
    tally = _Tally(gen, kept, gamma, kv_heads, view_layer, view_head)
    full_attention(model, gen.ids, tally.on_layer)
    result = {
        "kind": "cached",
        **describe(model, tok, gen, run),
        "gamma": gamma,
        "unit": "(decode step, layer, KV head, token so far)",
        "kv_heads": kv_heads,
        "categories": list(CATEGORIES),
        "per_layer": tally.counts,
        **_shares(tally.counts),
        "view": {"layer": view_layer, "kv_head": view_head, "per_step": tally.per_step},
    }
    return write_result(Path(out), "cached", result, lambda path: _draw(path, result, tally.view))


class _KeptMasks:
    """Which token columns the policy's cache held at each decode step: an eviction observer.

    ``masks[layer]``: one ``[kv_heads, total]`` bool mask per decode step, ``total`` = prompt + max new tokens.
    """

    def __init__(self, n_layers: int, total: int) -> None:
        self.total = total
        self.masks: dict[int, list[torch.Tensor]] = {i: [] for i in range(n_layers)}

    def record(self, event: Eviction) -> None:
        before = event.before
        if event.step >= 1:
            mask = torch.zeros(before.shape[0], self.total, dtype=torch.bool, device=before.device)
            mask.scatter_(1, before.clamp(min=0), before >= 0)
            self.masks[event.layer_idx].append(mask)

    def held(self, layer: int, n: int) -> torch.Tensor:
        """``[kv_heads, steps, n]`` bool: what ``layer``'s cache held at each decode step, over the first ``n``."""
        return torch.stack(self.masks[layer], dim=1)[..., :n]


class _Tally:
    """The counts of :func:`analyze_cached`, one layer at a time (a :func:`full_attention` callback).

    ``counts``: per layer, the (step, KV head, token) count of each category; ``view [n, steps]`` uint8: each
    token's category (1..4, 0: not yet generated) at each step in the viewed layer and KV head; ``per_step``:
    that view's counts per step.
    """

    def __init__(self, gen: Generation, kept: _KeptMasks, gamma: float, kv_heads: int, layer: int, head: int):
        steps, n = gen.steps, gen.ids.shape[1]
        self.q_cols = torch.arange(gen.query_col(1), gen.query_col(steps) + 1, device=gen.ids.device)  # [S]
        self.kept, self.gamma, self.kv_heads = kept, gamma, kv_heads
        self.view_layer, self.view_head = layer, head
        self.counts: list[dict] = [{} for _ in kept.masks]
        self.per_step: list[dict] = []
        self.view = torch.zeros(n, steps, dtype=torch.uint8)

    def on_layer(self, layer: int, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        cats, so_far = self.categories(probs, self.kept.held(layer, probs.shape[-1]))
        self.counts[layer] = {
            "layer": layer,
            **{k: int(v.sum()) for k, v in cats.items()},
            "total": int(so_far.sum()) * self.kv_heads,
        }
        if layer == self.view_layer:
            self.add_view(cats)

    def categories(self, probs: torch.Tensor, held: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each category's ``[kv_heads, S, n]`` bool mask, and ``so_far [1, S, n]`` (the tokens up to each step).

        ``probs [q_heads, n, n]``: the layer's full attention; ``held [kv_heads, S, n]``: what its cache held.
        """
        q_heads, n, steps = probs.shape[0], probs.shape[-1], self.q_cols.shape[0]
        p = probs[:, self.q_cols].view(self.kv_heads, q_heads // self.kv_heads, steps, n).mean(1)  # [Hkv, S, n]
        top = p.amax(dim=(0, 2))  # [S]
        active = p > self.gamma * top[None, :, None]
        so_far = (torch.arange(n, device=p.device)[None, :] <= self.q_cols[:, None])[None]  # [1, S, n]
        cats = {
            "activated_kept": active & held & so_far,
            "activated_evicted": active & ~held & so_far,
            "kept_inactive": ~active & held & so_far,
            "inactive_evicted": ~active & ~held & so_far,
        }
        return cats, so_far

    def add_view(self, cats: dict[str, torch.Tensor]) -> None:
        """The viewed KV head's categories into ``view`` and ``per_step``."""
        head = self.view_head
        for code, name in enumerate(CATEGORIES, 1):
            self.view[cats[name][head].T.cpu()] = code
        for s in range(self.view.shape[1]):
            row = {"step": s + 1, "query_col": int(self.q_cols[s])}
            self.per_step.append({**row, **{name: int(cats[name][head, s].sum()) for name in CATEGORIES}})


def _shares(counts: list[dict]) -> dict:
    """The totals over layers, the share of activated tokens kept and the share of kept tokens activated."""
    totals = {k: sum(c[k] for c in counts) for k in (*CATEGORIES, "total")}
    activated = totals["activated_kept"] + totals["activated_evicted"]
    kept = totals["activated_kept"] + totals["kept_inactive"]
    return {
        "totals": totals,
        "activated_recall": totals["activated_kept"] / activated if activated else None,
        "kept_precision": totals["activated_kept"] / kept if kept else None,
    }


# -- the figure ---------------------------------------------------------------------------------------------
def _draw(path: Path, result: dict, view: torch.Tensor) -> None:
    """Counts per layer (left) and the per-step view ``[n, steps]`` of one layer and KV head (right)."""
    from matplotlib.patches import Patch

    figure, axes = new_figure(1, 2, size=(13, 5))
    _draw_per_layer(axes[0, 0], result["per_layer"], result["gamma"])
    _draw_view(axes[0, 1], view, result["prompt_tokens"], result["view"])
    handles = [Patch(color=CATEGORY_COLORS[c], label=CATEGORY_LABELS[c]) for c in CATEGORIES]
    figure.legend(handles=handles, fontsize="small", loc="outside lower center", ncol=len(handles))
    figure.suptitle(title(result, "Activated tokens (full attention) vs the policy's cache"), fontsize=10)
    save_png(figure, path)


def _draw_per_layer(ax, counts: list[dict], gamma: float) -> None:
    """Stacked bars of the activated and the kept counts per layer."""
    xs = [c["layer"] for c in counts]
    bottom = [0] * len(xs)
    for name in CATEGORIES[:3]:
        values = [c[name] for c in counts]
        ax.bar(xs, values, bottom=bottom, color=CATEGORY_COLORS[name], label=CATEGORY_LABELS[name], width=0.8)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    integer_ticks(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"(step, KV head, token) count, gamma={gamma:g}")
    ax.set_title("Activated vs kept tokens per layer (evicted and inactive not stacked)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")


def _draw_view(ax, view: torch.Tensor, prompt_tokens: int, where: dict) -> None:
    """Each token's category (rows) at each decode step (columns) of one layer and KV head."""
    from matplotlib.colors import ListedColormap

    steps = view.shape[1]
    cmap = ListedColormap(["white", *(CATEGORY_COLORS[c] for c in CATEGORIES)])
    ax.imshow(view.numpy(), cmap=cmap, vmin=-0.5, vmax=4.5, aspect="auto", interpolation="nearest", origin="lower")
    ax.axhline(prompt_tokens - 0.5, color="black", linewidth=0.7, linestyle="--")
    ax.set_xlabel("decode step")
    ax.set_ylabel("token (column; dashed: end of prompt)")
    ax.set_title(f"Layer {where['layer']}, KV head {where['kv_head']}, per step", fontsize=10)
    ticks = range(0, steps, max(1, steps // 8))
    ax.set_xticks(ticks, [str(s + 1) for s in ticks])


def headline(result: dict) -> str:
    t, recall = result["totals"], result["activated_recall"]
    share = "n/a" if recall is None else f"{100 * recall:.1f}%"
    return f"activated and kept {t['activated_kept']}, activated but evicted {t['activated_evicted']} ({share} kept)"
