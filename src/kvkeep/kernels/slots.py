"""Slot bookkeeping of a static cache's decode step, one small Triton launch each instead of ~25 torch ops.

- :func:`append_slot` writes the new token's K/V, position and a zero score into each row's free slot.
- :func:`evict_slot` empties, in each row over budget, the lowest-priority slot outside the sinks and the
  recent window (ties: the newest token), then points the row's free slot at its first empty slot.

They compute exactly what :class:`kvkeep.cache.SlotLayer`'s ``update`` / ``evict`` compute with torch ops (a
row is one (sequence, KV head)); the protection rule is :func:`kvkeep.policies.protected`'s.  Everything is
read through pointers, so both run inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, on_input_device

__all__ = ["append_slot", "evict_slot"]


@triton.jit
def _append_kernel(
    K, V, POS, SC, FREE, NK, NV, NEWPOS, heads,
    stride_kr, stride_ks, stride_vr, stride_vs, stride_nk, stride_nv, slots, head_dim,
    HAS_SCORES: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(FREE + row)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < head_dim
    tl.store(K + row * stride_kr + slot * stride_ks + offs, tl.load(NK + row * stride_nk + offs, mask=mask), mask=mask)
    tl.store(V + row * stride_vr + slot * stride_vs + offs, tl.load(NV + row * stride_nv + offs, mask=mask), mask=mask)
    tl.store(POS + row * slots + slot, tl.load(NEWPOS + row // heads))
    if HAS_SCORES:
        tl.store(SC + row * slots + slot, 0.0)


@on_input_device
def append_slot(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scores: torch.Tensor | None,
    free: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    position: torch.Tensor,
) -> None:
    """Write one token per row into its free slot, in place.

    Args:
        keys, values: ``[B, H, slots, D]`` slot buffers (contiguous); positions, scores: ``[B, H, slots]``.
        free: ``[B, H]`` int64 slot of each row's newcomer.
        new_keys, new_values: ``[B, H, 1, D]`` the new token's states.
        position: ``[B]`` int64 the new token's true position in each sequence.
    """
    batch, heads, slots, head_dim = keys.shape
    new_keys = new_keys.reshape(batch * heads, head_dim)
    new_values = new_values.reshape(batch * heads, head_dim)
    _append_kernel[(batch * heads,)](
        keys, values, positions, scores if scores is not None else positions, free, new_keys, new_values, position,
        heads,
        keys.stride(1), keys.stride(2), values.stride(1), values.stride(2), new_keys.stride(0), new_values.stride(0),
        slots, head_dim, HAS_SCORES=scores is not None, BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


@triton.jit
def _evict_kernel(
    POS, SC, FREE, BUDGET, RECENT, NEWEST, heads, slots, sinks,
    LIMITED: tl.constexpr, HAS_SCORES: tl.constexpr, INTERPRET: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // heads
    base = POS + row * slots
    newest = tl.load(NEWEST + b)
    recent_start = newest - tl.load(RECENT + b) if LIMITED else newest
    big = float("inf")
    count = tl.zeros([], tl.int32)
    best_p = tl.full([], big, tl.float32)
    best_pos = tl.full([], -2, tl.int64)
    best_slot = tl.full([], -1, tl.int32)
    first_empty = tl.full([], slots, tl.int32)
    offs0 = tl.arange(0, BLOCK)
    n0 = 0
    while n0 < slots:
        offs = n0 + offs0
        inside = offs < slots
        pos = tl.load(base + offs, mask=inside, other=-1)
        valid = pos >= 0
        count += tl.sum(valid.to(tl.int32), 0)
        first_empty = tl.minimum(first_empty, tl.min(tl.where(inside & ~valid, offs, slots), 0))
        if LIMITED:
            candidate = valid & (pos >= sinks) & (pos <= recent_start)  # not protected()
            if HAS_SCORES:
                score = tl.load(SC + row * slots + offs, mask=inside, other=0.0)
            else:
                score = tl.zeros([BLOCK], tl.float32)
            priority = tl.where(candidate, score, big)
            low = tl.min(priority, 0)
            newest = tl.max(tl.where(candidate & (priority == low), pos, -2).to(tl.int64), 0)
            slot = tl.max(tl.where(candidate & (priority == low) & (pos == newest), offs, -1), 0)
            better = (low < best_p) | ((low == best_p) & (newest > best_pos))
            best_p = tl.where(better, low, best_p)
            best_pos = tl.where(better, newest, best_pos)
            best_slot = tl.where(better, slot, best_slot)
        n0 += BLOCK
    if LIMITED:
        over = (count > tl.load(BUDGET + b)) & (best_slot >= 0)
        if over:
            tl.store(base + best_slot, -1)
            first_empty = tl.minimum(first_empty, best_slot)
    tl.store(FREE + row, first_empty.to(tl.int64))


@on_input_device
def evict_slot(
    positions: torch.Tensor,
    scores: torch.Tensor | None,
    free: torch.Tensor,
    newest: torch.Tensor,
    *,
    budget: torch.Tensor | None,
    recent: torch.Tensor | None,
    sinks: int,
) -> None:
    """Evict at most one token per row over budget, then set each row's free slot; in place.

    Args:
        positions: ``[B, H, slots]`` int64 columns (-1: empty); scores: ``[B, H, slots]`` float32 or None
            (then every candidate ties and the newest goes, as with torch's all-zero priority).
        free: ``[B, H]`` int64, written.  newest: ``[B]`` int64 each sequence's newest position.
        budget, recent: ``[B]`` int64 per sequence (``budget`` None: nothing is evicted).
        sinks: first positions that are never evicted.
    """
    batch, heads, slots = positions.shape
    limited = budget is not None
    dummy = newest
    _evict_kernel[(batch * heads,)](
        positions, scores if scores is not None else dummy, free,
        budget if limited else dummy, recent if limited else dummy, newest,
        heads, slots, sinks,
        LIMITED=limited, HAS_SCORES=scores is not None, INTERPRET=INTERPRET, BLOCK=1024,
    )  # fmt: skip
