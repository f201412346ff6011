"""Triton prompt (prefill) scores of the scoring policies, without an ``n x n`` attention matrix.

The prompt's attention output comes from elsewhere (SDPA); this computes only what H2O / CO2 (``"probs"``)
and Keyformer (``"gumbel"``) add to the running score for the prompt: for every key, the sum over the
real query rows of its softmax probability (or of ``softmax((logits + g) / tau)``), per query head, then
reduced over the group's query heads.  Two passes, no atomics, deterministic:

1. per block of query rows, an online softmax over the causal key blocks gives each row's log-sum-exp
   (base 2, ``+inf`` for a row with no allowed key) in a ``[B, Hq, n]`` float32 scratch;
2. per block of keys, a loop over the query-row blocks at or below it recomputes the logits (and the
   same counter-based noise) and sums ``exp2(x - lse_row)`` over the rows: ``[B, Hq, n]`` column sums,
   which torch reduces over the group (a cheap ``[B, Hkv, group, n]`` mean / sum / amax).

Assumption (a fresh prompt, the cache empty before it): key ``j`` has column ``j`` or ``-1`` (padding), and
query row ``r`` has column ``r``.  The loops then stop at the causal limit by index (rows ``r`` see keys
``j <= r``); the masks themselves compare the loaded key columns.  Padding keys and padding query rows are
never read (their keys/queries may hold anything, NaN included).  With ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..policies import ScoreSpec, reduce_heads
from .common import INTERPRET, check_spec, gumbel, int32_key, next_pow2, on_input_device, workspace
from .common import row_hash as row_hash_of

__all__ = ["prefill_scores", "prompt_lse"]

_LOG2E = 1.4426950408889634

#: ``(big, small, num_warps, num_stages)`` by input dtype.  Pass 1 takes ``big`` query rows per program and
#: ``small`` keys per iteration; pass 2 ``big`` keys per program and ``small`` rows per iteration (``big`` a
#: multiple of ``small``, so the diagonal is exactly ``big / small`` masked iterations).  16-bit inputs: the
#: flash-attention forward shape for ``D = 128`` on Hopper (two warpgroups of m64 wgmma tiles, a 32 KiB
#: resident Q or K tile plus 3 stages of 16 KiB streamed tiles).  float32 (an exact "ieee" dot on CUDA cores,
#: tests only): half-size tiles and 2 stages to stay within registers and shared memory.
_CONFIG = {torch.float32: (64, 32, 4, 2)}
_CONFIG_16 = (128, 64, 8, 3)


@triton.jit
def _lse_block(
    q,
    n0,
    rows,
    k_base,
    c_base,
    stride_kn,
    stride_cn,
    n,
    offs_d,
    qk_scale,
    noise_scale,
    m_i,
    l_i,
    row_hash,
    shift,
    CAUSAL: tl.constexpr,
    NOISE: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Keys ``[n0, n0 + BLOCK_N)`` of the rows ``rows`` [M]: online (max, sum) update in base 2."""
    keys = n0 + tl.arange(0, BLOCK_N)
    col = tl.load(c_base + keys * stride_cn, mask=keys < n, other=-1)
    valid = col >= 0
    if EVEN_D:
        k_mask = valid[:, None]
    else:
        k_mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kn + offs_d[None, :], mask=k_mask, other=0.0)  # padding never read
    if INTERPRET:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N] float32
    bias = tl.where(valid, 0.0, float("-inf"))
    if NOISE:
        noise = gumbel(row_hash[:, None], (col - shift)[None, :])
        x = qk * qk_scale + noise * noise_scale + bias[None, :]
    else:
        x = qk * qk_scale + bias[None, :]
    if CAUSAL:
        x = tl.where(col[None, :] <= rows[:, None], x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(x - m_use[:, None]), 1)
    return m_new, l_i


@triton.jit(do_not_specialize=["noise_key", "head_offset", "first_row"])
def _lse_kernel(
    Q,
    K,
    COLS,
    REAL,
    PAD,
    LSE,
    qk_scale,
    noise_scale,
    noise_key,
    head_offset,
    first_row,
    n,
    q_heads,
    group,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_cb,
    stride_ch,
    stride_cn,
    stride_rb,
    stride_rn,
    NOISE: tl.constexpr,
    HAS_REAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 1, one (query row block, sequence x query head): ``LSE[bh, r] = log2 sum_j exp2(x[r, j])``.

    The grid covers the row blocks from the one holding ``first_row`` on (rows before it score nothing).
    """
    blk = first_row // BLOCK_M + tl.num_programs(0) - 1 - tl.program_id(0)  # the longest (last) blocks first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // q_heads
    h = bh % q_heads
    kvh = h // group
    m0 = blk * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_in = rows < n
    q_ok = row_in
    if HAS_REAL:
        q_ok = q_ok & (tl.load(REAL + b * stride_rb + rows * stride_rn, mask=row_in, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        q_mask = q_ok[:, None]
    else:
        q_mask = q_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(K.dtype.element_ty)
    if INTERPRET:  # the interpreter's tl.dot gets bfloat16 wrong: dots in float32 there
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    c_base = COLS + b * stride_cb + kvh * stride_ch

    shift = 0
    row_hash = rows.to(tl.uint32)
    if NOISE:
        if HAS_PAD:
            shift = tl.load(PAD + b)
        row_hash = row_hash_of(noise_key, kvh + head_offset, h % group, rows - shift)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    diag_end = tl.minimum(m0 + BLOCK_M, n)
    # Key blocks wholly left of the row block: key column j < m0 <= r, no causal mask needed.
    for n0 in range(0, m0, BLOCK_N):
        m_i, l_i = _lse_block(q, n0, rows, k_base, c_base, stride_kn, stride_cn, n, offs_d, qk_scale, noise_scale,
                              m_i, l_i, row_hash, shift, False, NOISE, EVEN_D, HEAD_DIM, INTERPRET, DOT_PRECISION,
                              BLOCK_N)  # fmt: skip
    for n0 in range(m0, diag_end, BLOCK_N):
        m_i, l_i = _lse_block(q, n0, rows, k_base, c_base, stride_kn, stride_cn, n, offs_d, qk_scale, noise_scale,
                              m_i, l_i, row_hash, shift, True, NOISE, EVEN_D, HEAD_DIM, INTERPRET, DOT_PRECISION,
                              BLOCK_N)  # fmt: skip
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))  # +inf: no allowed key, p = 0
    tl.store(LSE + bh * n + rows, lse, mask=row_in)


@triton.jit
def _colsum_block(
    k,
    col,
    m0,
    q_base,
    lse_base,
    r_base,
    stride_qn,
    stride_rn,
    n,
    offs_d,
    qk_scale,
    noise_scale,
    noise_key,
    noise_head,
    gi,
    shift,
    acc,
    CAUSAL: tl.constexpr,
    NOISE: tl.constexpr,
    HAS_REAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Rows ``[m0, m0 + BLOCK_M)`` against the program's keys ``k`` [N, D]: ``acc [N] += sum_r p[r, key]``."""
    rows = m0 + tl.arange(0, BLOCK_M)
    q_ok = rows < n
    if HAS_REAL:
        q_ok = q_ok & (tl.load(r_base + rows * stride_rn, mask=q_ok, other=0) != 0)
    if EVEN_D:
        q_mask = q_ok[:, None]
    else:
        q_mask = q_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    # Rows out of range or padding: q = 0 and lse = +inf, so x = -inf and p = 0 without a per-element mask.
    q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0).to(k.dtype)
    lse = tl.load(lse_base + rows, mask=q_ok, other=float("inf"))
    qk = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [N, M] float32
    if NOISE:
        noise = gumbel(row_hash_of(noise_key, noise_head, gi, rows - shift)[None, :], (col - shift)[:, None])
        x = qk * qk_scale + noise * noise_scale - lse[None, :]
    else:
        x = qk * qk_scale - lse[None, :]
    if CAUSAL:
        x = tl.where(col[:, None] <= rows[None, :], x, float("-inf"))
    return acc + tl.sum(tl.exp2(x), 1)


@triton.jit(do_not_specialize=["noise_key", "head_offset", "first_row"])
def _colsum_kernel(
    Q,
    K,
    COLS,
    REAL,
    PAD,
    LSE,
    OUT,
    qk_scale,
    noise_scale,
    noise_key,
    head_offset,
    first_row,
    n,
    q_heads,
    group,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_cb,
    stride_ch,
    stride_cn,
    stride_rb,
    stride_rn,
    NOISE: tl.constexpr,
    HAS_REAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Pass 2, one (key block, sequence x query head): ``OUT[bh, j] = sum_r exp2(x[r, j] - LSE[bh, r])``."""
    n0 = tl.program_id(0) * BLOCK_N  # the first key blocks (the most rows) start first
    bh = tl.program_id(1).to(tl.int64)
    b = bh // q_heads
    h = bh % q_heads
    kvh = h // group
    keys = n0 + tl.arange(0, BLOCK_N)
    key_in = keys < n
    col = tl.load(COLS + b * stride_cb + kvh * stride_ch + keys * stride_cn, mask=key_in, other=-1)
    valid = col >= 0
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        k_mask = valid[:, None]
    else:
        k_mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    k_ptrs = K + b * stride_kb + kvh * stride_kh + keys[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)  # padding keys never read
    if INTERPRET:
        k = k.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    lse_base = LSE + bh * n
    r_base = REAL + b * stride_rb
    shift = 0
    if NOISE:
        if HAS_PAD:
            shift = tl.load(PAD + b)
    gi = h % group
    noise_head = kvh + head_offset

    acc = tl.zeros([BLOCK_N], tl.float32)
    diag_end = tl.minimum(n0 + BLOCK_N, n)
    first_m = (first_row // BLOCK_M) * BLOCK_M  # rows before first_row score nothing: their blocks are skipped
    for m0 in range(tl.maximum(n0, first_m), diag_end, BLOCK_M):
        acc = _colsum_block(k, col, m0, q_base, lse_base, r_base, stride_qn, stride_rn, n, offs_d, qk_scale,
                            noise_scale, noise_key, noise_head, gi, shift, acc, True, NOISE, HAS_REAL, EVEN_D,
                            HEAD_DIM, INTERPRET, DOT_PRECISION, BLOCK_M)  # fmt: skip
    # Row blocks wholly below the key block: every key column j < n0 + BLOCK_N <= r, no causal mask needed.
    for m0 in range(tl.maximum(n0 + BLOCK_N, first_m), n, BLOCK_M):
        acc = _colsum_block(k, col, m0, q_base, lse_base, r_base, stride_qn, stride_rn, n, offs_d, qk_scale,
                            noise_scale, noise_key, noise_head, gi, shift, acc, False, NOISE, HAS_REAL, EVEN_D,
                            HEAD_DIM, INTERPRET, DOT_PRECISION, BLOCK_M)  # fmt: skip
    tl.store(OUT + bh * n + keys, tl.where(valid, acc, 0.0), mask=key_in)  # padding keys: 0 (NaN never leaks)


@on_input_device
def prefill_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_cols: torch.Tensor,
    scaling: float,
    *,
    spec: ScoreSpec,
    layer_idx: int = 0,
    head_offset: int = 0,
    tau: float = 1.0,
    query_real: torch.Tensor | None = None,
    padding: torch.Tensor | None = None,
    first_row: int = 0,
    lse: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    _blocks: tuple[int, int] | None = None,
    _poison: bool = False,
) -> torch.Tensor:
    """The prompt's score step: per key, the summed (noisy, tempered) softmax probability of the real query rows.

    Query row ``r`` has column ``r`` and may attend key ``j`` when ``0 <= key_cols[b, h, j] <= r``; a fresh
    prompt is assumed (``key_cols[b, h, j]`` is ``j`` or ``-1``: only the shapes are checked).

    Args:
        query: ``[B, Hq, n, D]`` the prompt's queries (bf16, fp16 or fp32; last dim contiguous or copied).
        keys: ``[B, Hkv, n, D]`` the prompt's keys, ``Hq`` a multiple of ``Hkv``.
        key_cols: ``[B, Hkv or 1, n]`` int64 column of each key, -1 for padding (never attended nor read).
        scaling: factor applied to ``q . k``.
        spec: the policy's score: ``probs`` (softmax, H2O / CO2) or ``tempered`` (``softmax((x + g) / tau)``,
            with the counter-based noise ``g`` when ``spec.noise_seed`` is set), and its ``head_reduce`` over
            the group's query heads, after the row sum.
        layer_idx: the layer, for the noise key.
        head_offset: the model's index of KV head 0 of ``keys``, for the noise (a tensor-parallel rank's first
            head; 0 otherwise).
        tau: temperature (tempered only; the prompt uses the schedule's first value).
        query_real: ``[B, n]`` bool, the real query rows (padding rows contribute nothing; never read).
        padding: ``[B]`` int64 left padding: true position = column - padding (noise hash only).
        first_row: query rows before it score nothing (the observation window ``[first_row, n)``); both passes
            skip their row blocks, so only the window's rows are read (its time is not measured yet).
        lse: ``[B, Hq, n]`` float32 natural log-sum-exp of each row's scaled logits over its allowed keys (flash
            attention's, computed with the output; +inf for a row without any): pass 1 is skipped (``probs`` only).
        sink_logits: ``[Hq]`` learned sink logits (gpt-oss): a ``probs`` score's row log-sum-exp takes in each
            head's ``exp(sink)``, so the column sums are of the model's probabilities (a tempered score has no
            sink: :mod:`kvkeep.policies.base`).
        _blocks: ``(big, small)`` block sizes (tests); _poison: NaN-fill scratch and output before launch.

    Returns:
        ``[B, Hkv, n]`` float32 (0 for padding keys).
    """
    _check_inputs(query, keys, key_cols, spec, tau, query_real, padding, first_row, sink_logits, lse)
    batch, q_heads, n, _ = query.shape
    kv_heads = keys.shape[1]
    if n == 0 or first_row == n:
        return torch.zeros(batch, kv_heads, n, dtype=torch.float32, device=query.device)
    if first_row > 0:  # rows of the first scored block that lie before first_row: masked like padding rows
        window = torch.arange(n, device=query.device) >= first_row
        query_real = window.expand(batch, n) if query_real is None else query_real.bool() & window
    inv_tau = 1.0 / float(tau) if spec.tempered else 1.0
    noise = spec.tempered and spec.noise_seed is not None
    launch = _Launch(query, keys, key_cols, scaling * inv_tau, query_real, padding if noise else None, _blocks,
                     _poison, noise_scale=inv_tau * _LOG2E, head_offset=head_offset, first_row=first_row,
                     noise_key=int32_key(spec.noise_seed, layer_idx) if noise else None)  # fmt: skip
    lse = launch.row_lse() if lse is None else (lse.float() * _LOG2E).contiguous()  # base 2, as pass 1's
    if sink_logits is not None and not spec.tempered:
        torch.logaddexp2(lse, sink_logits.float().view(1, q_heads, 1) * _LOG2E, out=lse)
    group = q_heads // kv_heads
    return reduce_heads(launch.column_sums(lse).view(batch, kv_heads, group, n), spec.head_reduce)


@on_input_device
def prompt_lse(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_cols: torch.Tensor,
    scaling: float,
    *,
    query_real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each query row's log-sum-exp of its (unmasked) logits ``q . k * scaling`` over the keys it may attend,
    as :func:`prefill_scores` defines them (pass 1 alone): with a learned sink ``s``, a row's share of its
    attention mass on real keys is ``sigmoid(lse - s)``, the factor that turns SDPA's output into gpt-oss's.

    Args as :func:`prefill_scores`'.  Returns ``[B, Hq, n]`` float32 (natural log; ``+inf`` for a row without
    any key it may attend).
    """
    _check_inputs(query, keys, key_cols, ScoreSpec(), 1.0, query_real, None, 0, None, None)
    if query.shape[2] == 0:
        return query.new_zeros(query.shape[:3], dtype=torch.float32)
    launch = _Launch(query, keys, key_cols, scaling, query_real, None, None, False)
    return launch.row_lse() / _LOG2E


class _Launch:
    """The two passes' common arguments for one prompt (see the module docstring); ``scaling`` already divided by
    the temperature, ``padding`` given only for the noise."""

    def __init__(self, query, keys, key_cols, scaling, query_real, padding, blocks, poison, *, noise_scale=_LOG2E,
                 noise_key=None, head_offset=0, first_row=0):  # fmt: skip
        batch, q_heads, n, head_dim = query.shape
        if query.stride(-1) != 1:
            query = query.contiguous()
        if keys.stride(-1) != 1:
            keys = keys.contiguous()
        key_cols = key_cols.long()  # itself when already int64
        kv_heads = keys.shape[1]
        self.buffer = workspace(query.device, poison)
        self.shape, self.first_row = (batch, q_heads, n), first_row
        self.big, self.small, num_warps, num_stages = _launch_config(keys.dtype, blocks)
        block_d = max(16, next_pow2(head_dim))
        real = query_real
        if real is not None and real.dtype == torch.bool:
            real = real.view(torch.uint8)
        stride_ch = key_cols.stride(1) if key_cols.shape[1] == kv_heads else 0
        noise = noise_key is not None
        self.args = (query, keys, key_cols, real if real is not None else key_cols,
                     padding if padding is not None else key_cols)  # fmt: skip
        self.scalars = (
            float(scaling) * _LOG2E, noise_scale, noise_key or 0, int(head_offset), int(first_row), n, q_heads,
            q_heads // kv_heads, *query.stride()[:3], *keys.stride()[:3], key_cols.stride(0), stride_ch,
            key_cols.stride(2), *(real.stride() if real is not None else (0, 0)),
        )  # fmt: skip
        self.meta = dict(
            NOISE=noise, HAS_REAL=real is not None, HAS_PAD=noise and padding is not None, EVEN_D=block_d == head_dim,
            HEAD_DIM=head_dim, INTERPRET=INTERPRET, DOT_PRECISION="ieee" if keys.dtype == torch.float32 else None,
            BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip

    def row_lse(self) -> torch.Tensor:
        """Pass 1: ``[B, Hq, n]`` base-2 log-sum-exp of each row from the block holding ``first_row`` on."""
        batch, q_heads, n = self.shape
        lse = self.buffer(batch, q_heads, n)
        row_blocks = math.ceil(n / self.big) - self.first_row // self.big
        _lse_kernel[(row_blocks, batch * q_heads)](
            *self.args, lse, *self.scalars, BLOCK_M=self.big, BLOCK_N=self.small, **self.meta
        )
        return lse

    def column_sums(self, lse: torch.Tensor) -> torch.Tensor:
        """Pass 2: ``[B, Hq, n]`` each key's summed probability over the rows, given pass 1's ``lse``."""
        batch, q_heads, n = self.shape
        colsum = self.buffer(batch, q_heads, n)
        _colsum_kernel[(math.ceil(n / self.big), batch * q_heads)](
            *self.args, lse, colsum, *self.scalars, BLOCK_M=self.small, BLOCK_N=self.big, **self.meta
        )
        return colsum


def _launch_config(dtype: torch.dtype, blocks: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """``(big block, small block, warps, stages)`` for keys of ``dtype`` (``blocks``: the tests' block sizes)."""
    big, small, num_warps, num_stages = _CONFIG.get(dtype, _CONFIG_16)
    if blocks is not None:
        big, small = blocks
    if big % small or min(big, small) < 16:
        raise ValueError(f"blocks {(big, small)}: need small >= 16 dividing big")
    return big, small, num_warps, num_stages


def _check_inputs(query, keys, key_cols, spec, tau, query_real, padding, first_row, sink_logits, lse) -> None:
    """:func:`prefill_scores`' argument checks, each a one-line ``ValueError``."""
    if query.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"query and keys must be 4-D [B, H, n, D], got {tuple(query.shape)}, {tuple(keys.shape)}")
    batch, q_heads, n, head_dim = query.shape
    kv_heads = keys.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    # The fresh-prompt assumption, by shape: as many keys as query rows, one column per key.
    if keys.shape != (batch, kv_heads, n, head_dim) or key_cols.dim() != 3:
        raise ValueError(f"keys {tuple(keys.shape)} must be [B, Hkv, n, D] for query {tuple(query.shape)}")
    if key_cols.shape[0] != batch or key_cols.shape[1] not in (1, kv_heads) or key_cols.shape[2] != n:
        raise ValueError(f"key_cols {tuple(key_cols.shape)} must be [B, Hkv or 1, n] = [{batch}, {kv_heads}, {n}]")
    if query_real is not None and query_real.shape != (batch, n):
        raise ValueError(f"query_real {tuple(query_real.shape)} must be [B, n] = [{batch}, {n}]")
    if padding is not None and padding.shape != (batch,):
        raise ValueError(f"padding {tuple(padding.shape)} must be [B] = [{batch}]")
    if not 0 <= first_row <= n:
        raise ValueError(f"first_row {first_row} must be in [0, n = {n}]")
    if sink_logits is not None and tuple(sink_logits.shape) != (q_heads,):
        raise ValueError(f"sink_logits {tuple(sink_logits.shape)} must be [Hq] = [{q_heads}]")
    check_spec(spec, tau)
    if lse is not None and (spec.tempered or lse.shape != (batch, q_heads, n)):
        raise ValueError(f"lse {tuple(lse.shape)} must be [B, Hq, n] = [{batch}, {q_heads}, {n}], for a probs score")
    if spec.tempered and not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
