"""The single attention entry of kvkeep, and ``attend``, the torch reference every kernel is tested against.

``kvkeep_attention`` is registered in transformers' ``AttentionInterface`` under the name ``"kvkeep"``; a
model runs it in the forwards that get a kvkeep cache (:func:`kvkeep.hf.install`).  When the keys it receives
belong to a kvkeep cache layer (:func:`bind` marks them), that layer computes the attention over its kept
tokens, scores them and evicts.  For any other cache (a model switched to ``"kvkeep"`` for a block by
:func:`kvkeep.hf.switched`, or an adapted MPT / GPT-J) it computes plain causal attention through PyTorch's
SDPA (:func:`plain_attention`; :func:`attend` with soft-capping, ALiBi, learned sinks or a probe).  Nothing
is kept between calls: an error leaves no state behind.

:func:`attend` builds the mask from the true position of every cached token (so evicted, padded and future
tokens are never attended), works in chunks of query rows (no ``n x n`` tensor for a long prompt) and hands
the same logits to the policy's score.

Learned attention sinks (gpt-oss and the models that pass ``s_aux`` to their attention): each query head's sink
logit is one more column of its softmax's denominator, whose probability is dropped; what the policies' scores
make of it is stated once, in :mod:`kvkeep.policies.base`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .policies.base import masked_softmax, reduce_heads, sink_view

ATTN_NAME = "kvkeep"
#: Float32 elements per logits chunk (64 MiB): bounds prompt-phase memory whatever the prompt length.
CHUNK_ELEMENTS = 1 << 24

Scorer = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
#: ``probe(probs [B, q_heads, rows, keys] float32, allowed [B, rows, keys] bool)``.
Probe = Callable[[torch.Tensor, torch.Tensor], None]

_local = threading.local()


def bind(keys: torch.Tensor, layer) -> torch.Tensor:
    """Mark ``keys`` as the kept keys of ``layer`` (a weak reference): kvkeep's attention entry routes them there."""
    keys._kvkeep_layer = weakref.ref(layer)
    return keys


def bound_layer(keys: torch.Tensor):
    """The cache layer ``keys`` belong to, or None."""
    ref = getattr(keys, "_kvkeep_layer", None)
    return ref() if ref is not None else None


@contextmanager
def probe(callback: Probe) -> Iterator[None]:
    """Within the block, every attention call that does not go through a kvkeep cache layer (a forward with
    ``use_cache=False`` or a plain transformers cache) hands its softmax probabilities to ``callback``, once
    per call, in call order (one forward: call ``i`` is layer ``i``).  Used by the analyses."""
    previous = getattr(_local, "probe", None)
    _local.probe = callback
    try:
        yield
    finally:
        _local.probe = previous


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    scorer: Scorer | None = None,
    head_reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention with an optional per-token score, in chunks of query rows.

    Args:
        query: ``[batch, q_heads, rows, head_dim]``.
        keys, values: ``[batch, kv_heads, slots, head_dim]`` (``q_heads`` a multiple of ``kv_heads``).
        key_positions: ``[batch, kv_heads or 1, slots]`` int64 true position of each key, -1 for a slot that
            must never be attended (evicted, empty or padding).
        query_positions: ``[batch, rows]`` int64 true position of each query row (negative: a padding row,
            which attends nothing and scores nothing).
        scaling: factor applied to ``q . k``.
        sliding_window: a query attends only keys with ``query_pos - key_pos < sliding_window``.
        softcap: logits soft-capping ``tanh(x / c) * c`` (Gemma 2 style).
        alibi_slopes: ``[q_heads]`` ALiBi slopes; the bias is ``-slope * (query_pos - key_pos)``, the true
            distance however many tokens were evicted in between.
        sink_logits: ``[q_heads]`` learned sink logit of each query head (gpt-oss): an extra term
            ``exp(sink)`` in each row's softmax denominator, attending to nothing.
        scorer: ``scorer(logits, allowed, rows) -> [batch, kv_heads, group, len(rows), slots]`` score
            contributions of a chunk (logits float32 ``[batch, kv_heads, group, len(rows), slots]``).
        head_reduce: how the ``group`` query heads of a KV head combine: mean, sum or max.

    Returns:
        ``(output [batch, rows, q_heads, head_dim], scores [batch, kv_heads, slots] float32 or None)``.
    """
    batch, q_heads, rows, head_dim = query.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.view(batch, kv_heads, group, rows, head_dim)
    k_t = keys.float().transpose(-1, -2)  # [B, Hkv, D, L]
    v = values.float()  # [B, Hkv, L, Dv]
    kp = key_positions[:, :, None, None, :]  # [B, Hkv|1, 1, 1, L]
    valid_key = kp >= 0
    qpos = query_positions.to(kp.device)[:, None, None, :, None]  # [B, 1, 1, rows, 1]
    out = torch.empty(batch, kv_heads, group, rows, values.shape[-1], dtype=torch.float32, device=query.device)
    head_scores = None
    if scorer is not None:
        head_scores = torch.zeros(batch, kv_heads, group, slots, dtype=torch.float32, device=query.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.float().to(query.device).view(1, kv_heads, group, 1, 1)
    sinks = sink_view(sink_logits, kv_heads)

    step = max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * slots))
    for start in range(0, rows, step):
        chunk = slice(start, min(rows, start + step))
        qc = qpos[:, :, :, chunk]
        allowed = valid_key & (kp <= qc)
        if sliding_window is not None:
            allowed = allowed & (kp > qc - sliding_window)
        n = qc.shape[3]  # the group's query heads and the chunk's rows share one matmul per KV head
        logits = torch.matmul(q[:, :, :, chunk].float().reshape(batch, kv_heads, group * n, -1), k_t)
        logits = logits.view(batch, kv_heads, group, n, slots) * scaling
        if alibi_slopes is not None:
            logits = logits - slopes * (qc - kp).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        probs = masked_softmax(logits, allowed, sinks)
        out[:, :, :, chunk] = torch.matmul(probs.view(batch, kv_heads, group * n, slots), v).view(
            batch, kv_heads, group, n, -1
        )
        if scorer is not None:
            head_scores += scorer(logits, allowed, chunk).sum(dim=3)

    output = out.view(batch, q_heads, rows, -1).transpose(1, 2).to(query.dtype)
    return output, None if head_scores is None else reduce_heads(head_scores, head_reduce)


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
        s_aux: (in ``kwargs``) ``[q_heads]`` learned sink logits, as gpt-oss passes them.
    Returns:
        ``(output [batch, q_len, q_heads, head_dim], None)``.
    """
    sinks = check_sinks(kwargs.get("s_aux"), query.shape[1])
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = bound_layer(key)
    if layer is not None:
        out = layer.attend(query, attention_mask, scaling, softcap, alibi_slopes, sinks)
        return out.contiguous(), None  # as transformers' own entries: some models view() it

    # Any other cache (or none): the keys are the last kv_len columns of the sequence.
    batch, kv_len, q_len = key.shape[0], key.shape[2], query.shape[2]
    total = kv_len if attention_mask is None else attention_mask.shape[-1]
    cols = torch.arange(total - kv_len, total, device=key.device)
    key_cols = cols.view(1, 1, kv_len).expand(batch, 1, kv_len)
    if attention_mask is not None:
        key_cols = torch.where(attention_mask[:, None, -kv_len:].bool(), key_cols, -1)
    query_cols = torch.arange(total - q_len, total, device=key.device).expand(batch, q_len)
    callback = getattr(_local, "probe", None)
    if callback is None and softcap is None and alibi_slopes is None and sinks is None:
        return plain_attention(query, key, value, key_cols, query_cols, scaling, sliding_window), None
    scorer = None
    if callback is not None:
        q_heads, group = query.shape[1], query.shape[1] // key.shape[1]
        probs = torch.empty(batch, q_heads, q_len, kv_len, dtype=torch.float32, device=query.device)
        allowed_all = torch.empty(batch, q_len, kv_len, dtype=torch.bool, device=query.device)

        def scorer(logits: torch.Tensor, allowed: torch.Tensor, rows: slice) -> torch.Tensor:
            masked = masked_softmax(logits, allowed, sink_view(sinks, key.shape[1]))
            probs[:, :, rows] = masked.reshape(batch, q_heads, -1, kv_len)
            allowed_all[:, rows] = allowed[:, 0, 0]
            return logits.new_zeros(batch, key.shape[1], group, 1, kv_len)

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
        sink_logits=sinks,
        scorer=scorer,
    )
    if callback is not None:
        callback(probs, allowed_all)
    return out.contiguous(), None


def check_sinks(sink_logits: torch.Tensor | None, q_heads: int) -> torch.Tensor | None:
    """``sink_logits`` if it holds one logit per query head (``[q_heads]``); a one-line ``ValueError`` otherwise."""
    if sink_logits is not None and tuple(sink_logits.shape) != (q_heads,):
        raise ValueError(
            f"learned attention sinks of shape {tuple(sink_logits.shape)} do not match the {q_heads} query heads "
            "(kvkeep takes one sink logit per query head, [q_heads])"
        )
    return sink_logits


def plain_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """Attention for a cache that is not kvkeep's, through PyTorch's fused SDPA kernels: a model switched to
    kvkeep runs as fast as with transformers' ``sdpa`` outside a kvkeep cache.

    Shapes and masking as :func:`attend` (``key_positions [batch, 1, slots]``); returns ``[batch, rows, q_heads,
    head_dim]``.  A row with no key to attend (left padding) attends to every key, so it stays finite.
    ``dense``: the caller knows every key is real (no padding), so the check that waits for the device is skipped.
    """
    gqa = query.shape[1] != keys.shape[1]
    rows, slots = query.shape[2], keys.shape[2]
    window = sliding_window is not None and sliding_window < slots
    if rows == slots and not window and (dense or bool((key_positions >= 0).all())):  # a fresh prompt, no padding
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous()
    kp, qp = key_positions[:, :, None, :], query_positions.to(key_positions.device)[:, None, :, None]
    allowed = (kp >= 0) & (kp <= qp)  # [B, 1, rows, slots]
    if window:
        allowed = allowed & (kp > qp - sliding_window)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


def causal_attention_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fresh prompt without padding, through the flash kernel, which also gives each row's log-sum-exp: the
    output ``[batch, rows, q_heads, head_dim]`` and ``lse [batch, q_heads, rows]`` float32 (natural log of the sum of
    ``exp(scaling * q.k)`` over the row's causal keys).  None where that kernel does not run (not CUDA before
    Ampere, not 16-bit, a head size it lacks, or turned off by ``torch.backends.cuda.enable_flash_sdp(False)``):
    shapes as :func:`plain_attention`'s, ``keys`` holding one column per query row."""
    head_dim = query.shape[-1]
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or head_dim > 256:
        return None
    if torch.cuda.get_device_capability(query.device) < (8, 0) or not torch.backends.cuda.flash_sdp_enabled():
        return None
    group = query.shape[1] // keys.shape[1]
    if group > 1:  # the flash op takes a key head per query head
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention.default
    out, lse = flash(query, keys, values, 0.0, True, False, scale=scaling)[:2]  # (dropout, causal, debug mask)
    return out.transpose(1, 2).contiguous(), lse[:, :, : query.shape[2]]


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

    kvkeep builds the real mask inside attention from each cached token's position, so all it needs from
    the model is which columns are padding: ``[batch, seen + q_len]`` bool (all True without a mask).  A new
    tensor per forward, so that :func:`real_counts` can remember its counts on it for that forward's layers.
    """
    if attention_mask is None:
        mask = torch.ones(batch_size, kv_offset + kv_length, dtype=torch.bool, device=device)
        mask._kvkeep_every_real = True
        return mask
    return attention_mask.to(dtype=torch.bool, copy=True)


def real_counts(attention_mask: torch.Tensor | None, new: int, batch: int) -> list[int]:
    """Per sequence, the real (not padding) columns among the last ``new`` of a :func:`kvkeep_mask` mask
    ``[batch, columns]``, on the host: known at once for a mask made without padding, else counted with one wait
    for the device per forward (remembered on the mask for the other layers)."""
    if attention_mask is None or getattr(attention_mask, "_kvkeep_every_real", False):
        return [new] * batch
    known = getattr(attention_mask, "_kvkeep_counts", {})
    if new not in known:
        known[new] = attention_mask[:, -new:].sum(-1).tolist()
        attention_mask._kvkeep_counts = known
    return known[new]
