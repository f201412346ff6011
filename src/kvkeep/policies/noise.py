"""Counter-based Gumbel noise: a hash of (seed, layer, KV head, query head, query position, key position).

The same sequence gets the same noise whether it runs alone or in a batch, run after run, on the torch
path and in the Triton kernels (:mod:`kvkeep.kernels.common` computes the same hash bit for bit), and
under tensor parallelism: the KV head is the model's global head index, so a rank that holds heads
``[offset, offset + kv_heads)`` passes ``head_offset=offset`` and draws the noise one process would.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A 32-bit integer hash (xorshift-multiply); int64 inputs in [0, 2^32) never overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & M32
    return x ^ (x >> 16)


def uniform(h: torch.Tensor) -> torch.Tensor:
    """A float32 in (0, 1) from the top 23 bits of a 32-bit hash (24 would round up to exactly 1.0)."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def noise_key(seed: int, layer_idx: int = 0) -> int:
    """The 32-bit key of a layer's noise stream (the first two hash rounds of :func:`gumbel_noise`)."""
    return mix32(mix32(seed & M32) ^ layer_idx)


def gumbel_noise(
    seed: int,
    layer_idx: int,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    kv_heads: int,
    group: int,
    head_offset: int = 0,
) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[batch, kv_heads, group, rows, slots]`` for attention logits of that shape.

    Args:
        query_positions: ``[batch, rows]`` true positions of the query rows.
        key_positions: ``[batch, kv_heads or 1, slots]`` true positions of the keys.
        kv_heads, group: KV heads, and query heads per KV head.
        head_offset: the model's index of the first of these KV heads (a tensor-parallel rank's first head).
    """
    device = key_positions.device
    h = noise_key(seed, layer_idx)
    kv = torch.arange(head_offset, head_offset + kv_heads, device=device, dtype=torch.int64).view(1, kv_heads, 1, 1, 1)
    grp = torch.arange(group, device=device, dtype=torch.int64).view(1, 1, group, 1, 1)
    h = mix32(mix32(h ^ kv) ^ grp)
    qpos = (query_positions.to(device=device, dtype=torch.int64) & M32)[:, None, None, :, None]
    kpos = (key_positions.to(dtype=torch.int64) & M32)[:, :, None, None, :]
    h = mix32(mix32(h ^ qpos) ^ kpos)
    return -torch.log(-torch.log(uniform(h)))
