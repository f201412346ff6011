"""Triton decode attention that also updates the eviction policy's per-token score in the same pass.

One new query token per sequence attends over a layer's slot buffers (``[batch, kv_heads, slots, head_dim]``,
empty slots marked by position -1).  Split-K ("flash-decoding"): kernel 1 runs one program per (sequence,
KV head, slot range), handles the ``group`` query heads of that KV head together, reads every K and V
element once, and writes online-softmax partials plus, when scores are wanted, the per-slot logits (or the
Gumbel-noised tempered logits) to a float32 scratch.  Kernel 2 combines the partials into the output and
turns the scratch into the score step (softmax, reduced over the group's heads), folded into ``scores``.
A learned sink (gpt-oss) starts the first slot range's running max and sum at ``(sink, 1)``, so it joins each
row's softmax denominator once and the probabilities scored are the model's (the tempered score has no sink:
:mod:`kvkeep.policies.base`).

Everything a step changes is read through pointers and nothing synchronises with the host, so the call
can be captured in a CUDA graph.  With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..policies import ScoreSpec
from .common import (
    INTERPRET,
    REDUCE_CODES,
    check_spec,
    gumbel,
    int32_key,
    next_pow2,
    on_input_device,
    pair_hash,
    workspace,
)
from .common import row_hash as row_hash_of

__all__ = ["decode_attention"]

#: Slots per inner iteration of kernel 1.
BLOCK_N = 128
#: Slots per program of kernel 2's score update.
BLOCK_C = 256
#: Programs per SM that the split count aims for.
PROGRAMS_PER_SM = 4
#: Launch shape of kernel 1.
NUM_WARPS, NUM_STAGES = 4, 2


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM; also the default off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def num_splits_for(batch: int, kv_heads: int, slots: int, block_n: int = BLOCK_N, sm_count: int = 132) -> int:
    """Slot ranges per (sequence, KV head): about ``PROGRAMS_PER_SM`` programs per SM, at least a block each."""
    wanted = math.ceil(PROGRAMS_PER_SM * sm_count / max(1, batch * kv_heads))
    return max(1, min(wanted, math.ceil(slots / block_n)))


@triton.jit
def _tanh(x):
    """tanh, stable for any float32 ``x`` (no overflow: the exponent is never positive)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_block(
    q,
    n0,
    stop,
    k_base,
    v_base,
    p_base,
    stride_kc,
    stride_vc,
    stride_pc,
    offs_d,
    d_ok,
    scaling,
    softcap,
    m_i,
    l_i,
    acc,
    m2,
    l2,
    row_hash,
    inv_tau,
    s_rows,
    row_ok,
    SCORES: tl.constexpr,
    TEMPERED: tl.constexpr,
    NOISE: tl.constexpr,
    ONE_ROW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Slots ``[n0, min(n0 + BLOCK_N, stop))``: online-softmax update of ``(m_i, l_i, acc)`` (and of the tempered
    score's per-element running max and sum ``(m2, l2)`` ``[GROUP_PAD, BLOCK_N]``, reduced once after the last
    block); with ``SCORES`` the block's (noised, tempered) logits go to the scratch rows."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_range = offs_n < stop
    pos = tl.load(p_base + offs_n * stride_pc, mask=in_range, other=-1)
    valid = pos >= 0
    kv_mask = valid[:, None] & d_ok[None, :]  # empty slots are never read (they may hold garbage)
    k = tl.load(k_base + offs_n[:, None] * stride_kc + offs_d[None, :], mask=kv_mask, other=0.0)
    if INTERPRET:
        k = k.to(tl.float32)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scaling  # [GROUP_PAD, BLOCK_N] float32
    if SOFTCAP:  # Gemma 2: softcap * tanh(logits / softcap), before the mask and the score
        logits = softcap * _tanh(logits / softcap)
    logits = tl.where(valid[None, :], logits, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(logits, 1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(logits - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * stride_vc + offs_d[None, :], mask=kv_mask, other=0.0)
    p_v = p.to(v.dtype)
    if INTERPRET:
        p_v = p_v.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)

    if SCORES:
        if TEMPERED:
            if NOISE:
                if ONE_ROW:  # MHA: noise for the one real query row only, not the padded tile
                    logits = logits + gumbel(row_hash, pos)[None, :]
                else:
                    logits = logits + gumbel(row_hash[:, None], pos[None, :])
            logits = logits * inv_tau  # empty slots stay -inf
            # Per element, no reduction across warps: one exp updates the pair whether the max grows or not (m2
            # starts finite, so an empty slot's d is -inf: e = 0, nothing changes).
            d = logits - m2
            e = tl.exp2(tl.abs(d) * -1.4426950408889634)  # exp2 flushes subnormals: 3 instructions fewer than exp
            l2 = tl.where(d > 0, l2 * e + 1.0, l2 + e)
            m2 = tl.maximum(m2, logits)
        tl.store(s_rows[:, None] + offs_n[None, :], logits, mask=row_ok[:, None] & in_range[None, :])
    return m_new, l_i, acc, m2, l2


@triton.jit(do_not_specialize=["noise_key", "head_offset"])
def _split_kernel(
    Q,
    K,
    V,
    POS,
    QPOS,
    TAU,
    SINK,
    SCRATCH,
    PM,
    PL,
    PM2,
    PL2,
    PACC,
    OUT,
    scaling,
    softcap,
    noise_key,
    head_offset,
    slots,
    group,
    kv_heads,
    q_heads,
    head_dim,
    num_splits,
    split_size,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kc,
    stride_vb,
    stride_vh,
    stride_vc,
    stride_pb,
    stride_ph,
    stride_pc,
    SCORES: tl.constexpr,
    TEMPERED: tl.constexpr,
    NOISE: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    ONE_ROW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
):
    """One (sequence, KV head, slot range): online softmax of the group's query heads over the range."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // kv_heads).to(tl.int64)
    kvh = (pid % kv_heads).to(tl.int64)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < group
    head_rows = b * q_heads + kvh * group + rows  # flat (batch, query head) index
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:  # a compile-time all-true mask keeps K/V loads 16 bytes wide
        d_ok = offs_d < BLOCK_D
    else:
        d_ok = offs_d < head_dim

    q_ptrs = Q + b * stride_qb + (kvh * group + rows)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(K.dtype.element_ty)
    if INTERPRET:  # the interpreter's tl.dot gets bfloat16 wrong: dots in float32 there
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    p_base = POS + b * stride_pb + kvh * stride_ph

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    if SINKS:  # the sink's exp(sink - m) joins the sum once: in the first slot range
        sink = tl.load(SINK + kvh * group + rows, mask=row_ok, other=float("-inf")).to(tl.float32)
        m_i = tl.where(split == 0, sink, m_i)
    l_i = tl.where(m_i > float("-inf"), 1.0, 0.0)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    m2 = tl.full([GROUP_PAD, BLOCK_N], -3.0e38, tl.float32)  # finite: see _attend_block
    l2 = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
    row_hash = rows.to(tl.uint32)
    inv_tau = 1.0
    if TEMPERED:
        if NOISE:
            if ONE_ROW:
                row_hash = row_hash_of(noise_key, kvh + head_offset, kvh * 0, tl.load(QPOS + b))
            else:
                row_hash = row_hash_of(noise_key, kvh + head_offset, rows, tl.load(QPOS + b))
        inv_tau = 1.0 / tl.load(TAU + b)  # one division per program, not one per (row, slot)
    s_rows = SCRATCH + head_rows * slots

    start = split * split_size
    stop = tl.minimum(start + split_size, slots)
    for n0 in range(start, stop, BLOCK_N):
        m_i, l_i, acc, m2, l2 = _attend_block(
            q, n0, stop, k_base, v_base, p_base, stride_kc, stride_vc, stride_pc, offs_d, d_ok, scaling, softcap,
            m_i, l_i, acc, m2, l2, row_hash, inv_tau, s_rows, row_ok, SCORES, TEMPERED, NOISE, ONE_ROW, SOFTCAP,
            INTERPRET, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip

    part = head_rows * num_splits + split
    if ONE_SPLIT:
        inv_l = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
        o_ptrs = OUT + head_rows[:, None] * head_dim + offs_d[None, :]
        tl.store(o_ptrs, (acc * inv_l[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        a_ptrs = PACC + part[:, None] * head_dim + offs_d[None, :]
        tl.store(a_ptrs, acc, mask=row_ok[:, None] & d_ok[None, :])
    if SCORES or not ONE_SPLIT:
        tl.store(PM + part, m_i, mask=row_ok)
        tl.store(PL + part, l_i, mask=row_ok)
    if TEMPERED:
        m2_row = tl.max(m2, 1)  # -3e38 for a range without a filled slot, whose l2 is 0
        tl.store(PM2 + part, m2_row, mask=row_ok)
        tl.store(PL2 + part, tl.sum(l2 * tl.exp(m2 - m2_row[:, None]), 1), mask=row_ok)


@triton.jit
def _global_max_sum(PM, PL, head_rows, row_ok, num_splits, S_PAD: tl.constexpr):
    """Combine split partials ``(max, sum)`` of each row: -> (max with 0 for empty rows, 1 / sum or 0)."""
    offs_s = tl.arange(0, S_PAD)
    idx = head_rows[:, None] * num_splits + offs_s[None, :]
    mask = row_ok[:, None] & (offs_s < num_splits)[None, :]
    m = tl.load(PM + idx, mask=mask, other=float("-inf"))
    l_part = tl.load(PL + idx, mask=mask, other=0.0)
    big = tl.max(m, 1)
    big = tl.where(big > float("-inf"), big, 0.0)
    total = tl.sum(l_part * tl.exp(m - big[:, None]), 1)
    return big, tl.where(total > 0, 1.0 / tl.maximum(total, 1e-30), 0.0)


@triton.jit
def _add_split(acc, PM, PACC, part, big, row_ok, offs_d, mask, head_dim):
    """``acc + exp(m_split - big) * acc_split`` for one split ``part`` [GROUP_PAD] of each row."""
    w = tl.exp(tl.load(PM + part, mask=row_ok, other=float("-inf")) - big)
    return acc + w[:, None] * tl.load(PACC + part[:, None] * head_dim + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _combine_kernel(
    PM,
    PL,
    PM2,
    PL2,
    PACC,
    OUT,
    SCRATCH,
    POS,
    SC,
    keep,
    decay,
    slots,
    group,
    kv_heads,
    q_heads,
    head_dim,
    num_splits,
    stride_pb,
    stride_ph,
    stride_pc,
    stride_sb,
    stride_sh,
    stride_sc,
    WRITE_OUT: tl.constexpr,
    SCORES: tl.constexpr,
    TEMPERED: tl.constexpr,
    REDUCE: tl.constexpr,
    EWMA: tl.constexpr,
    INTERPRET: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (sequence, KV head, slot block): output (block 0 only) and the score update of the block."""
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    b = (pid // kv_heads).to(tl.int64)
    kvh = (pid % kv_heads).to(tl.int64)
    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < group
    head_rows = b * q_heads + kvh * group + rows
    big, inv_total = _global_max_sum(PM, PL, head_rows, row_ok, num_splits, S_PAD)

    if WRITE_OUT:
        if blk == 0:
            offs_d = tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
            acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
            if INTERPRET:
                s = 0
                while s < num_splits:
                    acc = _add_split(acc, PM, PACC, head_rows * num_splits + s, big, row_ok, offs_d, mask, head_dim)
                    s += 1
            else:
                for s in range(0, num_splits):
                    acc = _add_split(acc, PM, PACC, head_rows * num_splits + s, big, row_ok, offs_d, mask, head_dim)
            o_ptrs = OUT + head_rows[:, None] * head_dim + offs_d[None, :]
            tl.store(o_ptrs, (acc * inv_total[:, None]).to(OUT.dtype.element_ty), mask=mask)

    if SCORES:
        if TEMPERED:
            big, inv_total = _global_max_sum(PM2, PL2, head_rows, row_ok, num_splits, S_PAD)
        offs_c = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < slots
        pos = tl.load(POS + b * stride_pb + kvh * stride_ph + offs_c * stride_pc, mask=c_ok, other=-1)
        take = row_ok[:, None] & (pos >= 0)[None, :]
        x = tl.load(SCRATCH + head_rows[:, None] * slots + offs_c[None, :], mask=take, other=float("-inf"))
        s = tl.where(take, tl.exp(x - big[:, None]) * inv_total[:, None], 0.0)
        if REDUCE == 0:
            step = tl.sum(s, 0) / group
        elif REDUCE == 1:
            step = tl.sum(s, 0)
        else:
            step = tl.max(s, 0)
        sc_ptrs = SC + b * stride_sb + kvh * stride_sh + offs_c * stride_sc
        old = tl.load(sc_ptrs, mask=c_ok, other=0.0)
        if EWMA:
            new = keep * old + decay * step
        else:
            new = old + step
        tl.store(sc_ptrs, new, mask=c_ok)


@on_input_device
def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    *,
    scores: torch.Tensor | None = None,
    spec: ScoreSpec | None = None,
    layer_idx: int = 0,
    head_offset: int = 0,
    tau: torch.Tensor | None = None,
    query_pos: torch.Tensor | None = None,
    softcap: float | None = None,
    sink_logits: torch.Tensor | None = None,
    _num_splits: int | None = None,
    _block_n: int | None = None,
    _num_warps: int | None = None,
    _num_stages: int | None = None,
    _poison: bool = False,
) -> torch.Tensor:
    """Attention of one new token per sequence over slot buffers, with an optional in-place score update.

    Args:
        query: ``[B, Hq, D]`` (bf16, fp16 or fp32; last dim contiguous or it is copied).
        keys, values: ``[B, Hkv, C, D]`` slot buffers, last dim contiguous; ``Hq`` a multiple of ``Hkv``.
        positions: ``[B, Hkv, C]`` int64 true position of each slot, -1 for an empty slot (never attended or read).
        scaling: factor applied to ``q . k``.
        scores: ``[B, Hkv, C]`` float32 running score, updated in place when given (with ``spec``).
        spec: the policy's :class:`~kvkeep.policies.ScoreSpec`: ``probs`` adds the softmax probabilities,
            ``tempered`` ``softmax((logits + g) / tau)`` (``g`` the counter-based noise of
            :mod:`kvkeep.policies.noise` when ``spec.noise_seed`` is set); reduced over the group's heads by
            ``spec.head_reduce``; folded with ``spec.decay`` (0: ``scores += s``; ``a``: ``(1 - a) scores + a s``).
        layer_idx: the layer, for the noise key.
        head_offset: the model's index of KV head 0 of these buffers, for the noise (a tensor-parallel rank's
            first head; 0 otherwise).
        tau: ``[B]`` float32 temperature of each row, on the device (tempered only).
        query_pos: ``[B]`` int64 true position of each query (noise only).
        softcap: logit soft-capping ``softcap * tanh(logits / softcap)`` (Gemma 2), before mask and score.
        sink_logits: ``[Hq]`` learned sink logit of each query head (gpt-oss): one more term ``exp(sink)`` in
            each row's softmax denominator (the output's and a ``probs`` score's), attending to nothing.
        _num_splits, _block_n, _num_warps, _num_stages: override the launch shape (tests, tuning).
        _poison: fill output and workspaces with NaN before the launch (tests: every read value is written).

    Returns:
        ``[B, Hq, D]`` attention output in ``query.dtype`` (zeros for a sequence without any filled slot).
    """
    _check_inputs(query, keys, values, positions, scores, spec, tau, query_pos, sink_logits)
    batch, q_heads, head_dim = query.shape
    _, kv_heads, slots, _ = keys.shape
    if query.stride(-1) != 1:
        query = query.contiguous()
    device = query.device
    group = q_heads // kv_heads
    want_scores = scores is not None and spec is not None
    tempered = want_scores and spec.tempered
    noise = tempered and spec.noise_seed is not None

    block_n = _block_n or BLOCK_N
    splits = _num_splits or num_splits_for(batch, kv_heads, slots, block_n, _sm_count(device))
    splits, split_size = _split_size(slots, block_n, splits)
    one_split = splits == 1
    buffer = workspace(device, _poison)
    out = buffer(batch, q_heads, head_dim, dtype=query.dtype)
    parts = _Partials.allocate(buffer, out, splits, slots, want_scores, tempered)
    group_pad = max(16, next_pow2(group))
    block_d = max(16, next_pow2(head_dim))
    _split_kernel[(batch * kv_heads, splits)](
        query, keys, values, positions, query_pos if noise else positions, tau if tempered else out,
        out if sink_logits is None else sink_logits, parts.scratch,
        parts.m, parts.l, parts.m2, parts.l2, parts.acc, out, float(scaling), float(softcap or 1.0),
        int32_key(spec.noise_seed if noise else None, layer_idx), int(head_offset), slots, group, kv_heads, q_heads,
        head_dim, splits, split_size, query.stride(0), query.stride(1), *keys.stride()[:3], *values.stride()[:3],
        *positions.stride(), SCORES=want_scores, TEMPERED=tempered, NOISE=noise, ONE_SPLIT=one_split,
        INTERPRET=INTERPRET, DOT_PRECISION="ieee" if keys.dtype == torch.float32 else None, GROUP_PAD=group_pad,
        BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim, ONE_ROW=group == 1, SOFTCAP=softcap is not None,
        SINKS=sink_logits is not None, num_warps=_num_warps or NUM_WARPS, num_stages=_num_stages or NUM_STAGES,
    )  # fmt: skip
    if one_split and not want_scores:
        return out
    # the combine has no dot: its tile need not be padded to 16 rows (an MHA row of 16 did 16 times the work)
    _combine(parts, out, positions, scores if want_scores else None, spec, group, splits, next_pow2(group), block_d)
    return out


@dataclass
class _Partials:
    """The split kernel's per-split partials of each (sequence x query head) row, read by the combine kernel:
    running max and sum ``m, l`` ``[B * Hq, splits]`` (and the tempered score's ``m2, l2``), the weighted values
    ``acc`` ``[B * Hq, splits, D]``, and the score's logits ``scratch`` ``[B, Hq, C]``.  One not needed is the
    output tensor itself (never read)."""

    m: torch.Tensor
    l: torch.Tensor  # noqa: E741
    acc: torch.Tensor
    m2: torch.Tensor
    l2: torch.Tensor
    scratch: torch.Tensor

    @classmethod
    def allocate(cls, buffer, out: torch.Tensor, splits: int, slots: int, scores: bool, tempered: bool) -> _Partials:
        batch, q_heads, head_dim = out.shape
        rows, parts = batch * q_heads, scores or splits > 1
        return cls(
            buffer(rows, splits) if parts else out,
            buffer(rows, splits) if parts else out,
            buffer(rows, splits, head_dim) if splits > 1 else out,
            buffer(rows, splits) if tempered else out,
            buffer(rows, splits) if tempered else out,
            buffer(batch, q_heads, slots) if scores else out,
        )


def _combine(parts: _Partials, out, positions, scores, spec, group: int, splits: int, group_pad: int, block_d: int):
    """The combine kernel: the splits' partials into ``out`` (more than one split) and, with ``scores``
    ``[B, Hkv, C]``, the step's score folded into it in place."""
    batch, q_heads, head_dim = out.shape
    _, kv_heads, slots = positions.shape
    want_scores = scores is not None
    score_blocks = max(1, math.ceil(slots / BLOCK_C)) if want_scores else 1
    sc = scores if want_scores else out
    decay = spec.decay if want_scores else 0.0
    _combine_kernel[(batch * kv_heads, score_blocks)](
        parts.m, parts.l, parts.m2, parts.l2, parts.acc, out, parts.scratch, positions, sc, 1.0 - float(decay),
        float(decay), slots, group, kv_heads, q_heads, head_dim, splits, *positions.stride(), sc.stride(0),
        sc.stride(1), sc.stride(2) if want_scores else 0, WRITE_OUT=splits > 1, SCORES=want_scores,
        TEMPERED=want_scores and spec.tempered, REDUCE=REDUCE_CODES[spec.head_reduce] if want_scores else 0,
        EWMA=decay > 0, INTERPRET=INTERPRET, GROUP_PAD=group_pad, S_PAD=max(2, next_pow2(splits)), BLOCK_C=BLOCK_C,
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def _split_size(slots: int, block_n: int, splits: int) -> tuple[int, int]:
    """``(splits, split_size)``: the programs that share one row's ``slots`` (at most ``splits``, none empty) and
    the slots each covers, a multiple of ``block_n``."""
    blocks = max(1, math.ceil(slots / block_n))
    split_size = math.ceil(blocks / max(1, min(splits, blocks))) * block_n
    return max(1, math.ceil(slots / split_size)), split_size


def _check_inputs(query, keys, values, positions, scores, spec, tau, query_pos, sink_logits) -> None:
    """:func:`decode_attention`'s argument checks, each a one-line ``ValueError``."""
    q_heads, kv_heads = query.shape[1], keys.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    if sink_logits is not None and (tuple(sink_logits.shape) != (q_heads,) or sink_logits.stride(0) != 1):
        raise ValueError(f"sink_logits must be a contiguous [Hq] = [{q_heads}], got {tuple(sink_logits.shape)}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values must be contiguous in their last (head_dim) dimension")
    if keys.is_cuda and keys.dtype == torch.float32 and keys.shape[-1] > 128:  # measured on an H200: D=256 fails
        raise ValueError(
            f"float32 keys of head size {keys.shape[-1]} overflow the Triton decode kernel's shared memory: run the "
            "model in bfloat16 or float16, or build the cache with kernel='torch'"
        )
    if values.shape != keys.shape or positions.shape != keys.shape[:3]:
        raise ValueError(
            f"shapes disagree: keys {tuple(keys.shape)}, values {tuple(values.shape)}, positions "
            f"{tuple(positions.shape)} (want keys == values == [B, Hkv, C, D], positions [B, Hkv, C])"
        )
    if scores is None or spec is None:
        return
    check_spec(spec, tau)
    if scores.shape != positions.shape or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 {tuple(positions.shape)}, got {scores.dtype} {tuple(scores.shape)}")
    if spec.tempered and spec.noise_seed is not None and query_pos is None:
        raise ValueError("a noised score needs query_pos ([B] int64 true position of each query)")


def noise_probe(
    seed: int,
    layer_idx: int,
    kv_heads: int,
    group: int,
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    head_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' Gumbel hash and noise for ``[B, kv_heads, group, C]`` (tests compare with ``gumbel_noise``).

    Args:
        query_pos: ``[B]`` int64 true query positions; key_pos: ``[B, kv_heads, C]`` int64 true key positions.
        head_offset: the model's index of the first of the ``kv_heads``.
    Returns:
        ``(hash int64, noise float32)``, both ``[B, kv_heads, group, C]``.
    """
    batch, _, slots = key_pos.shape
    key_pos = key_pos.contiguous()
    hashes = torch.empty(batch, kv_heads, group, slots, dtype=torch.int64, device=key_pos.device)
    noise = torch.empty(batch, kv_heads, group, slots, dtype=torch.float32, device=key_pos.device)
    _noise_kernel[(batch * kv_heads,)](
        query_pos, key_pos, hashes, noise, int32_key(seed, layer_idx), int(head_offset), kv_heads, group, slots,
        GROUP_PAD=max(16, next_pow2(group)), BLOCK_N=max(16, next_pow2(slots)),
    )  # fmt: skip
    return hashes, noise


@triton.jit(do_not_specialize=["head_offset"])
def _noise_kernel(
    QPOS,
    KPOS,
    HASH,
    NOISE,
    noise_key,
    head_offset,
    kv_heads,
    group,
    slots,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // kv_heads
    kvh = pid % kv_heads
    rows = tl.arange(0, GROUP_PAD)
    offs = tl.arange(0, BLOCK_N)
    kpos = tl.load(KPOS + pid * slots + offs, mask=offs < slots, other=0)
    prefix = row_hash_of(noise_key, kvh + head_offset, rows, tl.load(QPOS + b))[:, None]
    idx = (pid * group + rows)[:, None] * slots + offs[None, :]
    mask = (rows < group)[:, None] & (offs < slots)[None, :]
    tl.store(HASH + idx, pair_hash(prefix, kpos[None, :]).to(tl.int64), mask=mask)
    tl.store(NOISE + idx, gumbel(prefix, kpos[None, :]), mask=mask)
