"""Attention and cache analyses: ``kvkeep analyze KIND ... --out DIR`` writes ``DIR/KIND.json`` and ``DIR/KIND.png``.

    kvkeep analyze sparsity --data cnndm --sample 0 --out runs/analysis
    kvkeep analyze heatmap --prompt-file article.txt --chat --layers 0,15,29 --heads 0,4 --out runs/analysis
    kvkeep analyze cached --data cnndm --policy co2 --budget 0.5 --gamma 0.01 --out runs/analysis
    kvkeep analyze replacement --data cnndm --policy h2o --budget 0.5 --out runs/analysis
    kvkeep analyze scores --data cnndm --policy keyformer --budget 0.5 --out runs/analysis

Kinds (each is a function ``analyze_<kind>(model, tok, input_ids, ..., out=DIR) -> dict``, usable from Python):

- ``sparsity`` (Keyformer Figure 11): share of full-attention probabilities below p% of their row's maximum
  (p in 0.1, 0.5, 1, 5, 10), per layer, mean over heads and query rows, over prompt + generation.
- ``heatmap`` (Keyformer Figures 14/15): full-attention maps (query rows x key columns, log colour scale) of
  chosen layers and query heads over prompt + generation.
- ``cached`` (CO2 Figures 3 and 12): at each decode step, layer and KV head, every token so far is
  *activated* (its full-attention probability, the mean over the query heads of that KV head, is above
  ``gamma`` x the layer's largest such probability at that step) or not, and *kept* (held by the policy's
  cache at that step) or not; counts per layer and a tokens x steps map of one layer and KV head.
- ``replacement`` (CO2 Figure 4): where each decode-step eviction falls among the score-managed candidates
  (the kept tokens that neither the recent window/FIFO nor the sinks protect, ordered by position;
  0 = the oldest candidate, 1 = the newest, the token that just left the recent window).
- ``scores``: the policy's accumulated scores at a few decode steps, and the scores of the evicted tokens
  against the candidates kept at the same evictions.

How it is measured, through public hooks only: generation is kvkeep's decode loop (greedy) through a
:class:`~kvkeep.cache.KVKeepCache` built with an ``observer``, which every eviction hands an
:class:`~kvkeep.cache.Eviction` (the positions and scores just before it are what that step attended to and
ranked; the positions after are what it kept).  Full-attention probabilities come from one forward of the whole
final sequence (prompt + generated tokens, no cache) inside :func:`kvkeep.attention.probe`, which hands each
layer's softmax probabilities to the analysis, one layer at a time. Sparsity and heat maps generate with full
attention; ``cached`` compares the policy's cache with full attention over the tokens the policy generated.

Memory: a layer's probabilities are ``heads x n x n`` float32 (n = prompt + new tokens), held one layer at a
time (heat maps keep the chosen maps). The command line caps the prompt at ``--max-prompt-tokens`` (default
1024); the Python functions take the prompt as given. Batch size 1 only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import probe
from ..cache import Eviction, KVKeepCache
from ..generation import generate, stop_token_ids
from ..hf import install
from ..policies import POLICIES, ScoringPolicy
from ..runinfo import run_metadata
from .data import Sample, load_dataset
from .tasks import prompt_ids

__all__ = [
    "CATEGORIES",
    "KINDS",
    "THRESHOLDS",
    "analyze_cached",
    "analyze_heatmap",
    "analyze_replacement",
    "analyze_scores",
    "analyze_sparsity",
    "data_prompt",
    "full_attention",
    "headline",
    "text_prompt",
    "update_result",
]

#: Thresholds of ``sparsity``, relative to each row's largest probability (Keyformer Figure 11).
THRESHOLDS = (0.001, 0.005, 0.01, 0.05, 0.1)
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
REPLACEMENT_BINS = 20
SCORE_BINS = 40
DEFAULT_POLICY, DEFAULT_BUDGET = "co2", 0.5
PNG_DPI = 110


# -- full-attention probabilities ---------------------------------------------------------------------
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def full_attention(model: torch.nn.Module, input_ids: torch.Tensor, callback: LayerCallback) -> None:
    """One cache-less forward of ``input_ids [1, n]``; ``callback(layer, probs, allowed)`` for every layer.

    ``probs`` is ``[q_heads, n, n]`` float32 (zero where a query may not attend), ``allowed`` ``[n, n]`` bool
    (causal, and within the window on sliding layers). Only one layer's probabilities are held at a time.
    """
    install(model)
    layers = _num_layers(model)
    ids = _as_ids(input_ids, model)
    calls = []

    def on_layer(probs: torch.Tensor, allowed: torch.Tensor) -> None:
        callback(len(calls), probs[0], allowed[0])
        calls.append(None)

    with torch.inference_mode(), probe(on_layer):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if len(calls) != layers:
        raise RuntimeError(f"expected {layers} attention calls in one forward, saw {len(calls)}")


# -- generation under a policy, observed through the cache's observer -------------------------------------
@dataclass
class _Generation:
    """A greedy generation: the whole sequence and its cache (the last token is never fed)."""

    ids: torch.Tensor  # [1, prompt + new]
    prompt_tokens: int
    new_tokens: int
    cache: KVKeepCache

    @property
    def steps(self) -> int:
        """Decode forwards: step s (1-based, ``Eviction.step``) feeds the s-th generated token."""
        return self.new_tokens - 1

    def query_col(self, step: int) -> int:
        return self.prompt_tokens + step - 1


def _policy_params(policy: str, budget: float | int | None, params: dict | None, max_new_tokens: int) -> dict:
    """KVKeepCache keywords: no budget for ``full``; the generation's length for Keyformer's schedule."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    return {"budget": None if policy == "full" else budget, **dict(params or {})}


def _generate(
    model: torch.nn.Module,
    input_ids,
    policy: str,
    params: dict,
    max_new_tokens: int,
    on_evict: Callable[[Eviction], None] | None = None,
    stop_at_eos: bool = True,
) -> _Generation:
    ids = _as_ids(input_ids, model)
    cache = KVKeepCache(model, policy, observer=on_evict, **params)
    stop = stop_token_ids(model) if stop_at_eos else None
    run = generate(model, ids, cache=cache, max_new_tokens=max_new_tokens, stop_ids=stop)
    generated = run.row(0)
    full = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype, device=ids.device)], dim=1)
    return _Generation(full, ids.shape[1], len(generated), cache)


# -- helpers --------------------------------------------------------------------------------------------
def _as_ids(input_ids, model: torch.nn.Module) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"analyses take one prompt: input_ids of shape [1, n], got {list(ids.shape)}")
    return ids.to(model.device)


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _eos_ids(model: torch.nn.Module) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos if isinstance(eos, list) else [eos])


def _text_config(model: torch.nn.Module):
    return model.config.get_text_config(decoder=True)


def _num_layers(model: torch.nn.Module) -> int:
    config = _text_config(model)
    for key in ("num_hidden_layers", "n_layer", "n_layers"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    raise ValueError("cannot tell the number of decoder layers of this model")


def _pick(values: Sequence[int] | None, size: int, what: str, default: Sequence[int]) -> list[int]:
    """Indices in ``range(size)`` (negative ones count from the end), deduplicated, in the given order."""
    chosen = []
    for v in default if values is None else values:
        index = v + size if v < 0 else v
        if not 0 <= index < size:
            raise ValueError(f"{what} {v} is out of range: the model has {size} (0..{size - 1})")
        if index not in chosen:
            chosen.append(index)
    if not chosen:
        raise ValueError(f"choose at least one {what}")
    return chosen


def _model_name(model: torch.nn.Module) -> str:
    path = getattr(model.config, "_name_or_path", "") or ""
    return Path(path).name or str(getattr(model.config, "model_type", "model"))


def _setup(model, tok, gen: _Generation, policy: str, params: dict) -> dict:
    """What every JSON starts with: the model, the sequence, the policy and the text generated."""
    config = gen.cache.policy.params() if policy != "full" else {}
    new = gen.ids[0, gen.prompt_tokens :].tolist()
    setup = {
        "model": _model_name(model),
        "prompt_tokens": gen.prompt_tokens,
        "new_tokens": gen.new_tokens,
        "decode_steps": gen.steps,
        "policy": policy,
        "budget": params.get("budget"),
        "params": config,
        "kept_budget": [None if layer.budget is None else int(layer.budget[0]) for layer in gen.cache.layers],
        "output_ids": new,
    }
    if tok is not None:
        setup["output"] = tok.decode(new, skip_special_tokens=True)
    return {**setup, **run_metadata(model)}


def _title(result: dict, what: str) -> str:
    policy = result["policy"] if result["policy"] == "full" else f"{result['policy']} budget {result['budget']}"
    return (
        f"{what}\n{result['model']} · {result['prompt_tokens']} prompt + {result['new_tokens']} new tokens · {policy}"
    )


def _write(out: Path, kind: str, result: dict, draw: Callable[[Path], None]) -> dict:
    """Write ``out/kind.json`` and, when matplotlib is there, ``out/kind.png`` (``result['png']``: its path or None)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{kind}.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result["png"] = None
        result["note"] = "no plot: matplotlib is not installed (pip install 'kvkeep[eval]')"
    else:
        draw(png)
        result["png"] = str(png)
    result["json"] = str(out / f"{kind}.json")
    return update_result(result)


def update_result(result: dict, **extra) -> dict:
    """Add ``extra`` to an analysis' result and (re)write its JSON file, ``result['json']``."""
    result.update(extra)
    Path(result["json"]).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (7, 4.5)):
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas draws the PNG

    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _pct(t: float) -> str:
    return f"{100 * t:g}%"


def _kv_group(model: torch.nn.Module) -> tuple[int, int]:
    """(query heads, query heads per KV head)."""
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    heads = heads or getattr(config, "n_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    return int(heads), int(heads) // int(kv)


# -- 1. sparsity ----------------------------------------------------------------------------------------
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
    gen = _generate(model, input_ids, "full", {}, max_new_tokens, stop_at_eos=stop_at_eos)
    per_layer: list[dict] = []

    def on_layer(layer: int, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        row_max = probs.amax(-1, keepdim=True)
        row_len = allowed.sum(-1).clamp(min=1).float()  # [n]
        share, pooled = [], []
        for t in thresholds:
            below = (probs < t * row_max) & allowed  # [H, n, n]
            counts = below.sum(-1).float()  # [H, n]
            share.append(float((counts / row_len).mean()))
            pooled.append(float(counts.sum() / (row_len.sum() * probs.shape[0])))
        per_layer.append({"layer": layer, "share_below": share, "pooled_below": pooled})

    full_attention(model, gen.ids, on_layer)
    result = {
        "kind": "sparsity",
        **_setup(model, tok, gen, "full", {}),
        "sequence_tokens": gen.ids.shape[1],
        "thresholds": thresholds,
        "threshold_labels": [_pct(t) for t in thresholds],
        "per_layer": per_layer,
        "mean_share_below": [
            sum(r["share_below"][i] for r in per_layer) / len(per_layer) for i in range(len(thresholds))
        ],
    }

    def draw(path: Path) -> None:
        figure, axes = _figure()
        ax = axes[0, 0]
        layers = [r["layer"] for r in per_layer]
        for i, t in enumerate(thresholds):
            ax.plot(
                layers, [100 * r["share_below"][i] for r in per_layer], marker="o", markersize=3, label=f"< {_pct(t)}"
            )
        _integer_ticks(ax)
        ax.set_xlabel("layer")
        ax.set_ylabel("attention scores below threshold (%)")
        ax.set_ylim(0, 100)
        ax.set_title(_title(result, "Share of attention scores below p% of the row maximum"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", title="p (of row max)", title_fontsize="small")
        figure.savefig(path, dpi=PNG_DPI, format="png")

    return _write(Path(out), "sparsity", result, draw)


# -- 2. heat maps ---------------------------------------------------------------------------------------
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
    n_layers = _num_layers(model)
    q_heads, _ = _kv_group(model)
    layers = _pick(layers, n_layers, "layer", [0, n_layers // 2, n_layers - 1])
    heads = _pick(heads, q_heads, "head", [0])
    gen = _generate(model, input_ids, "full", {}, max_new_tokens, stop_at_eos=stop_at_eos)
    maps: dict[tuple[int, int], torch.Tensor] = {}
    stats: list[dict] = []
    prompt = gen.prompt_tokens

    def on_layer(layer: int, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        if layer not in layers:
            return
        n = probs.shape[-1]
        cols = torch.arange(n, device=probs.device)
        near = allowed & (cols[None, :] > cols[:, None] - local)
        for head in heads:
            p = probs[head]
            maps[layer, head] = torch.where(allowed, p, torch.nan).cpu()
            gen_rows = p[prompt:, :prompt]
            stats.append(
                {
                    "layer": layer,
                    "head": head,
                    "first_token_mass": float(p[:, 0].mean()),
                    "self_mass": float(p.diagonal().mean()),
                    "local_mass": float((p * near).sum(-1).mean()),
                    "generation_prompt_mass": float(gen_rows.sum(-1).mean()) if gen_rows.numel() else None,
                    "max": float(p.max()),
                }
            )

    full_attention(model, gen.ids, on_layer)
    stats.sort(key=lambda s: (layers.index(s["layer"]), heads.index(s["head"])))
    result = {
        "kind": "heatmap",
        **_setup(model, tok, gen, "full", {}),
        "sequence_tokens": gen.ids.shape[1],
        "layers": layers,
        "heads": heads,
        "local": local,
        "maps": stats,
    }

    def draw(path: Path) -> None:
        from matplotlib import colormaps
        from matplotlib.colors import LogNorm

        rows, cols = len(layers), len(heads)
        figure, axes = _figure(rows, cols, size=(0.6 + 3.2 * cols, 0.9 + 3.0 * rows))
        positive = [float(m[m > 0].min()) for m in maps.values() if bool((m > 0).any())]
        norm = LogNorm(vmin=max(1e-6, min(positive, default=1e-6)), vmax=1.0)
        cmap = colormaps["viridis"].with_extremes(bad="white")
        image = None
        for i, layer in enumerate(layers):
            for j, head in enumerate(heads):
                ax = axes[i, j]
                m = maps[layer, head]
                image = ax.imshow(m.clamp(min=norm.vmin).numpy(), norm=norm, cmap=cmap, interpolation="nearest")
                for line in (ax.axvline, ax.axhline):
                    line(prompt - 0.5, color="white", linewidth=0.7, linestyle="--")
                ax.set_title(f"layer {layer}, head {head}", fontsize=9)
                ax.tick_params(labelsize=7)
                if i == rows - 1:
                    ax.set_xlabel("key token", fontsize=8)
                if j == 0:
                    ax.set_ylabel("query token", fontsize=8)
        figure.colorbar(image, ax=axes, shrink=min(0.8, 0.35 * rows), label="attention probability (log)")
        figure.suptitle(_title(result, "Attention maps (dashed: end of prompt)"), fontsize=10)
        figure.savefig(path, dpi=PNG_DPI, format="png")

    return _write(Path(out), "heatmap", result, draw)


# -- 3. activated vs cached tokens ----------------------------------------------------------------------
def analyze_cached(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    policy: str = DEFAULT_POLICY,
    budget: float | int | None = DEFAULT_BUDGET,
    params: dict | None = None,
    max_new_tokens: int = 64,
    gamma: float = 0.01,
    layer: int | None = None,
    head: int = 0,
    stop_at_eos: bool = True,
) -> dict:
    """Activated vs kept tokens per layer (CO2 Figure 12) and per step for one layer and KV head (Figure 3).

    Unit: (decode step, layer, KV head, token so far). A token is *activated* when its full-attention
    probability from the step's query (mean over the KV head's query heads) exceeds ``gamma`` x the
    largest such probability in the layer at that step; *kept* when the policy's cache held it at that
    step (the query attended to it). ``layer``/``head``: the per-step view (default: middle layer, KV head 0).
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if max_new_tokens < 2:
        raise ValueError("cached needs --max-new-tokens >= 2 (one decode step at least)")
    n_layers = _num_layers(model)
    view_layer = _pick(None if layer is None else [layer], n_layers, "layer", [n_layers // 2])[0]
    params = _policy_params(policy, budget, params, max_new_tokens)
    prompt_len = _as_ids(input_ids, model).shape[1]
    total = prompt_len + max_new_tokens
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in range(n_layers)}  # per layer: [kv_heads, total] per step

    def on_evict(event: Eviction) -> None:
        before = event.before
        if event.step >= 1:
            mask = torch.zeros(before.shape[0], total, dtype=torch.bool, device=before.device)
            mask.scatter_(1, before.clamp(min=0), before >= 0)
            kept[event.layer_idx].append(mask)

    gen = _generate(model, input_ids, policy, params, max_new_tokens, on_evict, stop_at_eos)
    steps, n = gen.steps, gen.ids.shape[1]
    if steps < 1:
        raise ValueError("the generation stopped at its first token: no decode step to analyse")
    kv_heads = gen.cache.layers[0].positions.shape[1]
    view_head = _pick([head], kv_heads, "KV head", [0])[0]
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
        **_setup(model, tok, gen, policy, params),
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

        figure, axes = _figure(1, 2, size=(13, 5))
        ax = axes[0, 0]
        xs = [c["layer"] for c in counts]
        bottom = [0] * len(xs)
        for name in CATEGORIES[:3]:
            values = [c[name] for c in counts]
            ax.bar(xs, values, bottom=bottom, color=CATEGORY_COLORS[name], label=CATEGORY_LABELS[name], width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        _integer_ticks(ax)
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
        figure.suptitle(_title(result, "Activated tokens (full attention) vs the policy's cache"), fontsize=10)
        figure.savefig(path, dpi=PNG_DPI, format="png")

    return _write(Path(out), "cached", result, draw)


# -- 4. where evictions fall ----------------------------------------------------------------------------
def _evictions(event: Eviction) -> list[tuple[int, int, int | None, int]]:
    """``(kv_head, position, index among candidates or None, candidates)`` of every token this eviction dropped."""
    before, after, candidate = event.before, event.after, event.candidates
    found = []
    for h in range(before.shape[0]):
        kept = set(after[h][after[h] >= 0].tolist())
        cands = sorted(before[h][candidate[h]].tolist())
        rank = {col: i for i, col in enumerate(cands)}
        for col in sorted(set(before[h][before[h] >= 0].tolist()) - kept):
            found.append((h, col, rank.get(col), len(cands)))
    return found


def analyze_replacement(
    model: torch.nn.Module,
    tok,
    input_ids,
    *,
    out: str | Path,
    policy: str = DEFAULT_POLICY,
    budget: float | int | None = DEFAULT_BUDGET,
    params: dict | None = None,
    max_new_tokens: int = 64,
    layers: Sequence[int] | None = None,
    bins: int = REPLACEMENT_BINS,
    stop_at_eos: bool = True,
) -> dict:
    """Where each decode-step eviction falls among the score-managed candidates (CO2 Figure 4).

    Per eviction: the evicted token's index among the candidates (kept tokens not protected as sinks or
    recent window/FIFO, ordered by position) normalised to [0, 1] (1: the newest candidate, the token that
    just left the recent window; a lone candidate counts as 1). Steps that evict one token per KV head are
    ``steady``; more (CO2 cutting the cache to its budget after N steps) are ``bulk``. Evictions of tokens
    that were not candidates (a sliding window's exits) are counted in ``outside_candidates``.
    """
    n_layers = _num_layers(model)
    chosen = _pick(layers, n_layers, "layer", range(n_layers))
    params = _policy_params(policy, budget, params, max_new_tokens)
    positions: list[float] = []
    kinds: list[str] = []
    per_layer = {i: {"layer": i, "evictions": 0, "evicted_delta": 0, "outside_candidates": 0} for i in chosen}
    per_step: dict[int, int] = {}

    def on_evict(event: Eviction) -> None:
        if event.step < 1 or event.layer_idx not in per_layer or event.policy != policy:
            return
        row = per_layer[event.layer_idx]
        row["evicted_delta"] += event.evicted
        if not event.evicted:
            return
        found = _evictions(event)
        bulk = len(found) > event.before.shape[0]
        for _, _, index, size in found:
            if index is None:
                row["outside_candidates"] += 1
                continue
            positions.append(index / (size - 1) if size > 1 else 1.0)
            kinds.append("bulk" if bulk else "steady")
            row["evictions"] += 1
        per_step[event.step] = per_step.get(event.step, 0) + len(found)

    gen = _generate(model, input_ids, policy, params, max_new_tokens, on_evict, stop_at_eos)
    edges = [i / bins for i in range(bins + 1)]

    def histogram(values: list[float]) -> list[int]:
        counts = [0] * bins
        for v in values:
            counts[min(bins - 1, int(v * bins))] += 1
        return counts

    steady = [p for p, k in zip(positions, kinds, strict=True) if k == "steady"]
    bulk = [p for p, k in zip(positions, kinds, strict=True) if k == "bulk"]
    rows = list(per_layer.values())
    result = {
        "kind": "replacement",
        **_setup(model, tok, gen, policy, params),
        "layers": chosen,
        "bin_edges": edges,
        "counts": histogram(positions),
        "counts_steady": histogram(steady),
        "counts_bulk": histogram(bulk),
        "evictions": len(positions),
        "evicted_delta": sum(r["evicted_delta"] for r in rows),
        "outside_candidates": sum(r["outside_candidates"] for r in rows),
        "newest_candidate": sum(p == 1.0 for p in positions),
        "mean_position": sum(positions) / len(positions) if positions else None,
        "mean_position_steady": sum(steady) / len(steady) if steady else None,
        "per_layer": rows,
        "evictions_per_step": [{"step": s, "evicted": c} for s, c in sorted(per_step.items())],
    }

    def draw(path: Path) -> None:
        figure, axes = _figure()
        ax = axes[0, 0]
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
        ax.bar(
            centers, result["counts_steady"], width=1 / bins, color="#1f77b4", label="steady (one per step and head)"
        )
        ax.bar(
            centers,
            result["counts_bulk"],
            width=1 / bins,
            bottom=result["counts_steady"],
            color="#ff7f0e",
            label="bulk (cut to budget)",
        )
        ax.set_xlim(0, 1)
        ax.set_xlabel("position of the evicted token among candidates (0 = oldest, 1 = just left the recent window)")
        ax.set_ylabel("evictions")
        ax.set_title(
            _title(result, f"Where evictions fall ({len(positions)} evictions, {len(chosen)} layers)"), fontsize=10
        )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
        figure.savefig(path, dpi=PNG_DPI, format="png")

    return _write(Path(out), "replacement", result, draw)


# -- 5. score distributions -----------------------------------------------------------------------------
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
    policy: str = DEFAULT_POLICY,
    budget: float | int | None = DEFAULT_BUDGET,
    params: dict | None = None,
    max_new_tokens: int = 64,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    bins: int = SCORE_BINS,
    stop_at_eos: bool = True,
) -> dict:
    """The policy's accumulated scores: their distribution at a few decode steps, and evicted vs kept.

    ``snapshots``: the scores of every cached token (pooled over the chosen layers and KV heads) at the
    given decode steps (default: four, evenly spaced, the last included), just before that step's eviction.
    ``evicted`` / ``kept``: at every decode-step eviction, the scores of the tokens dropped and of the
    candidates kept (protected sinks and recent tokens excluded). ``per_step``: their means per step.
    Histograms share log-spaced ``bin_edges``; scores <= 0 are counted in ``zeros`` only.
    """
    if policy not in POLICIES or not issubclass(POLICIES[policy], ScoringPolicy):
        scoring = [name for name, cls in POLICIES.items() if issubclass(cls, ScoringPolicy)]
        raise ValueError(f"policy '{policy}' keeps no scores: use one of {', '.join(scoring)}")
    n_layers = _num_layers(model)
    chosen = set(_pick(layers, n_layers, "layer", range(n_layers)))
    total_steps = max_new_tokens - 1
    if total_steps < 1:
        raise ValueError("scores needs --max-new-tokens >= 2 (one decode step at least)")
    wanted = sorted(set(steps)) if steps else sorted({max(1, round(total_steps * i / 4)) for i in range(1, 5)})
    if any(s < 1 for s in wanted):
        raise ValueError(f"steps are decode steps >= 1, got {wanted}")
    params = _policy_params(policy, budget, params, max_new_tokens)
    snaps: dict[int, list[torch.Tensor]] = {s: [] for s in wanted}
    evicted_scores: list[torch.Tensor] = []
    kept_scores: list[torch.Tensor] = []
    per_step: dict[int, list[torch.Tensor]] = {}

    def on_evict(event: Eviction) -> None:
        before, scores, after = event.before, event.scores, event.after
        if event.step < 1 or event.layer_idx not in chosen or scores is None or event.policy != policy:
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

    gen = _generate(model, input_ids, policy, params, max_new_tokens, on_evict, stop_at_eos)
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
        **_setup(model, tok, gen, policy, params),
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
        figure, axes = _figure(1, 2, size=(13, 4.8))
        edge_list = edges.tolist()
        ax = axes[0, 0]
        for snap in result["snapshots"]:
            total = max(1, sum(snap["hist"]))
            ax.stairs([c / total for c in snap["hist"]], edge_list, label=f"step {snap['step']} (n={snap['count']})")
        ax.set_xscale("log")
        ax.set_xlabel("accumulated score")
        ax.set_ylabel("share of cached tokens")
        ax.set_title("Scores of the cached tokens at decode steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
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
        ax.set_xscale("log")
        ax.set_xlabel("accumulated score at eviction time")
        ax.set_ylabel("share")
        ax.set_title("Evicted tokens vs candidates kept at the same evictions", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        figure.suptitle(_title(result, "Score distributions"), fontsize=10)
        figure.savefig(path, dpi=PNG_DPI, format="png")

    return _write(Path(out), "scores", result, draw)


KINDS: dict[str, Callable[..., dict]] = {
    "sparsity": analyze_sparsity,
    "heatmap": analyze_heatmap,
    "cached": analyze_cached,
    "replacement": analyze_replacement,
    "scores": analyze_scores,
}
POLICY_KINDS = ("cached", "replacement", "scores")


# -- the prompt of the command line ------------------------------------------------------------------
def data_prompt(tok, data: str, sample: int, limit: int) -> tuple[list[int], dict]:
    """Token ids of the ``sample``-th (0-based) sample of data set ``data`` prompted as in summarization (its
    document cut to fit ``limit`` tokens), and where it came from."""
    if sample < 0:
        raise ValueError(f"--sample must be >= 0, got {sample}")
    dataset = load_dataset(data, limit=sample + 1)
    if len(dataset.samples) <= sample:
        raise ValueError(f"--data {data} has {len(dataset.samples)} samples: no sample {sample}")
    chosen = dataset.samples[sample]
    ids, truncated = prompt_ids(tok, dataset.template, chosen, limit)
    return ids, {"data": data, "sample": sample, "sample_id": chosen.id, "truncated": truncated}


def text_prompt(tok, text: str, chat: bool, limit: int) -> tuple[list[int], dict]:
    """Token ids of ``text`` (in the chat template when ``chat``; cut to ``limit`` tokens), and how."""
    if chat:
        ids, truncated = prompt_ids(tok, "{doc}", Sample("prompt", text), limit)
    else:
        ids = tok(text, verbose=False)["input_ids"]
        truncated = len(ids) > limit
        ids = ids[:limit]
    return ids, {"chat": chat, "truncated": truncated}


def headline(result: dict) -> str:
    """One line of the main numbers of an analysis."""
    kind = result["kind"]
    if kind == "sparsity":
        pairs = zip(result["threshold_labels"], result["mean_share_below"], strict=True)
        return "mean share below " + ", ".join(f"{label}: {100 * v:.1f}%" for label, v in pairs)
    if kind == "heatmap":
        return f"{len(result['maps'])} maps of {result['sequence_tokens']} tokens"
    if kind == "cached":
        t, recall = result["totals"], result["activated_recall"]
        share = "n/a" if recall is None else f"{100 * recall:.1f}%"
        return (
            f"activated and kept {t['activated_kept']}, activated but evicted {t['activated_evicted']} ({share} kept)"
        )
    if kind == "replacement":
        mean = result["mean_position"]
        return f"{result['evictions']} evictions, mean position {'n/a' if mean is None else f'{mean:.2f}'}"
    return f"{result['evicted'].get('count', 0)} evicted scores, {len(result['snapshots'])} snapshots"
