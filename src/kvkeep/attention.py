"""The single attention entry of kvkeep.

``kvkeep_attention`` is registered in transformers' ``AttentionInterface`` under the name ``"kvkeep"``.
It computes ordinary softmax attention over whatever the cache returned, builds the mask itself from
the true column of every cached token (so evicted, padded and future tokens are never attended), and,
when the cache layer's policy scores tokens, turns the same logits into per-token scores in the same
pass.  Query rows are processed in chunks, so no ``n x n`` tensor is ever built for a long prompt.

For any other cache (``DynamicCache``, or no cache) it computes plain causal attention, so a model
switched to ``"kvkeep"`` behaves as before outside kvkeep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

ATTN_NAME = "kvkeep"
#: Float32 elements per logits chunk (64 MiB): bounds prompt-phase memory whatever the prompt length.
CHUNK_ELEMENTS = 1 << 24

_local = threading.local()


def set_pending(layer) -> None:
    """Called by a kvkeep cache layer's ``update``: the next attention call belongs to ``layer``."""
    if getattr(_local, "pending", None) is not None:
        raise RuntimeError(
            "a KVKeepCache layer was updated but its attention never ran through kvkeep: build the cache "
            "with KVKeepCache(model, ...) for the model that uses it, and do not switch its attention away"
        )
    _local.pending = layer


def _take_pending():
    layer = getattr(_local, "pending", None)
    _local.pending = None
    return layer


def clear_pending() -> None:
    """Forget a pending layer (after an exception interrupted a forward)."""
    _local.pending = None


Scorer = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_cols: torch.Tensor,
    query_cols: torch.Tensor,
    scaling: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scorer: Scorer | None = None,
    query_real: torch.Tensor | None = None,
    head_reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with an optional per-token score, in chunks of query rows.

    Args:
        query: ``[batch, q_heads, rows, head_dim]``.
        keys, values: ``[batch, kv_heads, slots, head_dim]`` (``q_heads`` a multiple of ``kv_heads``).
        key_cols: ``[batch, kv_heads or 1, slots]`` int64 column of each key in the (padded) sequence,
            -1 for a slot that must never be attended (evicted, empty or padding).
        query_cols: ``[rows]`` int64 column of each query row.
        scaling: factor applied to ``q . k``.
        sliding_window: a query attends only keys with ``query_col - key_col < sliding_window``.
        softcap: logits soft-capping ``tanh(x / c) * c`` (Gemma 2 style).
        alibi_slopes: ``[q_heads]`` ALiBi slopes; the bias is ``-slope * (query_col - key_col)``, the true
            distance however many tokens were evicted in between.
        scorer: ``scorer(logits, allowed, rows) -> [batch, kv_heads, group, len(rows), slots]`` score
            contributions of a chunk (logits float32 ``[batch, kv_heads, group, len(rows), slots]``).
        query_real: ``[batch, rows]`` bool, rows that are real tokens (padding rows score nothing).
        head_reduce: how the ``group`` query heads of a KV head combine: mean, sum or max.

    Returns:
        ``(output [batch, rows, q_heads, head_dim], scores [batch, kv_heads, slots] float32 or None)``.
    """
    batch, q_heads, rows, head_dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.view(batch, kv_heads, group, rows, head_dim)
    k_t = keys.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, L]
    v = values.float().unsqueeze(2)  # [B, Hkv, 1, L, Dv]
    kc = key_cols[:, :, None, None, :]  # [B, Hkv|1, 1, 1, L]
    valid_key = kc >= 0
    out = torch.empty(batch, kv_heads, group, rows, values.shape[-1], dtype=torch.float32, device=query.device)
    head_scores = None
    if scorer is not None:
        head_scores = torch.zeros(batch, kv_heads, group, slots, dtype=torch.float32, device=query.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().to(query.device).view(1, kv_heads, group, 1, 1)

    step = max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * slots))
    for start in range(0, rows, step):
        chunk = slice(start, min(rows, start + step))
        qc = query_cols[chunk].view(1, 1, 1, -1, 1)
        allowed = valid_key & (kc <= qc)
        if sliding_window is not None:
            allowed = allowed & (kc > qc - sliding_window)
        logits = torch.matmul(q[:, :, :, chunk].float(), k_t) * scaling
        if alibi_slopes is not None:
            logits = logits - slopes * (qc - kc).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        probs = torch.softmax(logits.masked_fill(~allowed, torch.finfo(torch.float32).min), dim=-1) * allowed
        out[:, :, :, chunk] = torch.matmul(probs, v)
        if scorer is not None:
            contrib = scorer(logits, allowed, chunk)
            if query_real is not None:
                contrib = contrib * query_real[:, None, None, chunk, None]
            head_scores += contrib.sum(dim=3)

    output = out.view(batch, q_heads, rows, -1).transpose(1, 2).to(query.dtype)
    if head_scores is None:
        return output, None
    if head_reduce == "sum":
        return output, head_scores.sum(dim=2)
    if head_reduce == "max":
        return output, head_scores.amax(dim=2)
    return output, head_scores.mean(dim=2)


def prompt_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_cols: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Causal attention of a fresh prompt through PyTorch's fused SDPA kernels (flash without padding).

    Args:
        query: ``[batch, q_heads, n, head_dim]``; keys, values: ``[batch, kv_heads, n, head_dim]``, key ``j``
            at column ``j`` of the prompt, the same ``n`` columns as the query rows.
        key_cols: ``[batch, kv_heads or 1, n]`` int64 column of each key, -1 for padding.

    Returns:
        ``[batch, n, q_heads, head_dim]``.  Rows with no key to attend (left padding) attend to every key,
        so they stay finite; nothing real ever attends to them.
    """
    gqa = query.shape[1] != keys.shape[1]
    real_keys = key_cols[:, :1] >= 0  # [B, 1, n]: padding is the same for every KV head of a fresh prompt
    if bool(real_keys.all()):
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        n = query.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        allowed = causal & real_keys[:, :, None, :]  # [B, 1, n, n]
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def kvkeep_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` entry (shapes as in ``sdpa_attention_forward``).

    Args:
        query: ``[batch, q_heads, q_len, head_dim]``; key/value: ``[batch, kv_heads, kv_len, head_dim]``.
        attention_mask: the 2D padding mask ``[batch, seen + q_len]`` produced by :func:`kvkeep_mask`.
    Returns:
        ``(output [batch, q_len, q_heads, head_dim], None)``.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks as learned logits (s_aux) are not supported by kvkeep")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = _take_pending()
    if layer is not None:
        if key is not layer.keys:
            raise RuntimeError("kvkeep attention received keys that are not those of its cache layer")
        return layer.attend(module, query, attention_mask, scaling, softcap=softcap, alibi_slopes=alibi_slopes), None

    # Any other cache (or none): the keys are the last kv_len columns of the sequence.
    kv_len, q_len = key.shape[2], query.shape[2]
    total = kv_len if attention_mask is None else attention_mask.shape[-1]
    cols = torch.arange(total - kv_len, total, device=key.device)
    key_cols = cols.view(1, 1, kv_len).expand(key.shape[0], 1, kv_len)
    if attention_mask is not None:
        key_cols = torch.where(attention_mask[:, None, -kv_len:].bool(), key_cols, -1)
    query_cols = torch.arange(total - q_len, total, device=key.device)
    out, _ = attend(
        query,
        key,
        value,
        key_cols,
        query_cols,
        scaling,
        sliding_window=sliding_window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    return out, None


def kvkeep_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs,
) -> torch.Tensor:
    """transformers ``AttentionMaskInterface`` entry: hand the 2D padding mask through untouched.

    kvkeep builds the real mask inside attention from each cached token's column, so all it needs from
    the model is which columns are padding: ``[batch, seen + q_len]`` bool (all True without a mask).
    """
    if attention_mask is None:
        return torch.ones(batch_size, kv_offset + kv_length, dtype=torch.bool, device=device)
    return attention_mask.to(dtype=torch.bool)
