"""``cached`` (CO2 Figures 3 and 12): the tokens full attention activates against the tokens a policy keeps."""

from __future__ import annotations

from pathlib import Path

import torch

from ...cache import Eviction
from .common import PolicyRun, as_ids, full_attention, num_layers, pick
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
    if run.max_new_tokens < 2:
        raise ValueError("cached needs --max-new-tokens >= 2 (one decode step at least)")
    n_layers = num_layers(model)
    view_layer = pick(None if layer is None else [layer], n_layers, "layer", [n_layers // 2])[0]
    prompt_len = as_ids(input_ids, model).shape[1]
    total = prompt_len + run.max_new_tokens
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in range(n_layers)}  # per layer: [kv_heads, total] per step

    def on_evict(event: Eviction) -> None:
        before = event.before
        if event.step >= 1:
            mask = torch.zeros(before.shape[0], total, dtype=torch.bool, device=before.device)
            mask.scatter_(1, before.clamp(min=0), before >= 0)
            kept[event.layer_idx].append(mask)

    gen = run.generate(model, input_ids, on_evict)
    steps, n = gen.steps, gen.ids.shape[1]
    if steps < 1:
        raise ValueError("the generation stopped at its first token: no decode step to analyse")
    kv_heads = gen.cache.layers[0].positions.shape[1]
    view_head = pick([head], kv_heads, "KV head", [0])[0]
    q_cols = torch.arange(gen.query_col(1), gen.query_col(steps) + 1, device=gen.ids.device)  # [S]
    counts: list[dict] = [{} for _ in range(n_layers)]
    per_step: list[dict] = []
    view = torch.zeros(n, steps, dtype=torch.uint8)  # 0: not yet; 1..4: CATEGORIES

    def on_layer(lay: int, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        q_heads = probs.shape[0]
        p = probs[:, q_cols].view(kv_heads, q_heads // kv_heads, steps, n).mean(1)  # [Hkv, S, n]
        top = p.amax(dim=(0, 2))  # [S]
        active = p > gamma * top[None, :, None]
        held = torch.stack(kept[lay], dim=1)[..., :n]  # [Hkv, S, n]
        so_far = (torch.arange(n, device=p.device)[None, :] <= q_cols[:, None])[None]  # [1, S, n]
        cats = {
            "activated_kept": active & held & so_far,
            "activated_evicted": active & ~held & so_far,
            "kept_inactive": ~active & held & so_far,
            "inactive_evicted": ~active & ~held & so_far,
        }
        counts[lay] = {
            "layer": lay,
            **{k: int(v.sum()) for k, v in cats.items()},
            "total": int(so_far.sum()) * kv_heads,
        }
        if lay == view_layer:
            for code, name in enumerate(CATEGORIES, 1):
                view[cats[name][view_head].T.cpu()] = code
            for s in range(steps):
                row = {"step": s + 1, "query_col": int(q_cols[s])}
                per_step.append({**row, **{name: int(cats[name][view_head, s].sum()) for name in CATEGORIES}})

    full_attention(model, gen.ids, on_layer)
    totals = {k: sum(c[k] for c in counts) for k in (*CATEGORIES, "total")}
    activated = totals["activated_kept"] + totals["activated_evicted"]
    result = {
        "kind": "cached",
        **describe(model, tok, gen, run),
        "gamma": gamma,
        "unit": "(decode step, layer, KV head, token so far)",
        "kv_heads": kv_heads,
        "categories": list(CATEGORIES),
        "per_layer": counts,
        "totals": totals,
        "activated_recall": totals["activated_kept"] / activated if activated else None,
        "kept_precision": (
            totals["activated_kept"] / (totals["activated_kept"] + totals["kept_inactive"])
            if totals["activated_kept"] + totals["kept_inactive"]
            else None
        ),
        "view": {"layer": view_layer, "kv_head": view_head, "per_step": per_step},
    }

    def draw(path: Path) -> None:
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch

        figure, axes = new_figure(1, 2, size=(13, 5))
        ax = axes[0, 0]
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
        ax = axes[0, 1]
        cmap = ListedColormap(["white", *(CATEGORY_COLORS[c] for c in CATEGORIES)])
        ax.imshow(view.numpy(), cmap=cmap, vmin=-0.5, vmax=4.5, aspect="auto", interpolation="nearest", origin="lower")
        ax.axhline(gen.prompt_tokens - 0.5, color="black", linewidth=0.7, linestyle="--")
        ax.set_xlabel("decode step")
        ax.set_ylabel("token (column; dashed: end of prompt)")
        ax.set_title(f"Layer {view_layer}, KV head {view_head}, per step", fontsize=10)
        ax.set_xticks(range(0, steps, max(1, steps // 8)), [str(s + 1) for s in range(0, steps, max(1, steps // 8))])
        handles = [Patch(color=CATEGORY_COLORS[c], label=CATEGORY_LABELS[c]) for c in CATEGORIES]
        figure.legend(handles=handles, fontsize="small", loc="outside lower center", ncol=len(handles))
        figure.suptitle(title(result, "Activated tokens (full attention) vs the policy's cache"), fontsize=10)
        save_png(figure, path)

    return write_result(Path(out), "cached", result, draw)


def headline(result: dict) -> str:
    t, recall = result["totals"], result["activated_recall"]
    share = "n/a" if recall is None else f"{100 * recall:.1f}%"
    return f"activated and kept {t['activated_kept']}, activated but evicted {t['activated_evicted']} ({share} kept)"
