"""The Triton decode kernel against the torch reference: ``attend`` with the real policies' scores.

Without CUDA the kernels run in Triton's interpreter on small CPU tensors (conftest sets
``TRITON_INTERPRET`` before anything imports triton); with CUDA on the GPU with model-sized shapes.
Each case prints a row of relative errors (``pytest -s`` shows the table).
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from conftest import require_triton

CUDA = torch.cuda.is_available()


require_triton()

from kvkeep.attention import attend  # noqa: E402
from kvkeep.kernels.decode import decode_attention, noise_probe  # noqa: E402
from kvkeep.policies import CO2Policy, H2OPolicy, KeyformerPolicy, ScoreSpec, StepInfo  # noqa: E402
from kvkeep.policies.noise import M32, gumbel_noise, mix32  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
LAYER, STEP, TOTAL = 3, 5, 8
THRESHOLD = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _case(name, batch, q_heads, kv_heads, slots, head_dim, dtype, mode, reduce, decay, splits, block_n, strided=False,
          offset=0, softcap=None, sinks=False):  # fmt: skip
    """``offset``: the model's index of KV head 0 (a tensor-parallel rank's heads), for the noise; ``softcap``:
    Gemma 2's logit soft-capping; ``sinks``: learned sink logits (gpt-oss), one per query head."""
    return pytest.param(
        dict(
            batch=batch,
            q_heads=q_heads,
            kv_heads=kv_heads,
            slots=slots,
            head_dim=head_dim,
            dtype=dtype,
            mode=mode,
            reduce=reduce,
            decay=decay,
            splits=splits,
            block_n=block_n,
            strided=strided,
            head_offset=offset,
            softcap=softcap,
            sinks=sinks,
        ),
        id=name,
    )


f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
if CUDA:
    CASES = [
        _case("mha-probs-mean-bf16", 4, 32, 32, 1500, 128, bf16, "probs", "mean", 0.0, None, None),
        _case("mha-gumbel-sum-ewma-fp32", 2, 32, 32, 1100, 128, f32, "gumbel", "sum", 0.3, None, None, True),
        _case("gqa4-probs-max-ewma-bf16", 8, 32, 8, 1200, 128, bf16, "probs", "max", 0.3, None, None),
        _case("gqa4-gumbel-mean-bf16-rank1", 8, 32, 8, 2000, 128, bf16, "gumbel", "mean", 0.0, 7, None, True, 8),
        _case("gqa4-gumbel-max-fp32-1split", 1, 32, 8, 1000, 128, f32, "gumbel", "max", 0.0, 1, None),
        _case("mqa8-probs-sum-fp32", 3, 8, 1, 1300, 128, f32, "probs", "sum", 0.0, None, None),
        _case("mqa8-gumbel-mean-ewma-bf16", 2, 8, 1, 1700, 128, bf16, "gumbel", "mean", 0.3, None, 128),
        _case("gqa4-probs-mean-fp16-small", 64, 32, 8, 16, 128, f16, "probs", "mean", 0.0, None, None),
        _case("gqa4-out-only-bf16", 8, 32, 8, 1500, 128, bf16, None, "mean", 0.0, None, None),
        _case("mha-out-only-bf16-1split", 16, 32, 32, 900, 128, bf16, None, "mean", 0.0, 1, None),
        _case("gqa4-tempered-mean-bf16", 8, 32, 8, 1500, 128, bf16, "tempered", "mean", 0.0, None, None),
        _case("gqa2-gumbel-sum-softcap-bf16", 8, 8, 4, 1300, 256, bf16, "gumbel", "sum", 0.0, None, None, softcap=0.5),
        _case("gqa2-probs-mean-softcap-fp32", 4, 8, 4, 900, 128, f32, "probs", "mean", 0.0, None, None, softcap=0.5),
        _case("gqa8-probs-mean-sinks-bf16", 8, 64, 8, 1500, 64, bf16, "probs", "mean", 0.0, None, None, sinks=True),
        _case("gqa8-gumbel-sum-sinks-bf16", 8, 64, 8, 1300, 64, bf16, "gumbel", "sum", 0.0, None, None, sinks=True),
        _case("gqa8-out-only-sinks-1split-bf16", 8, 64, 8, 900, 64, bf16, None, "mean", 0.0, 1, None, sinks=True),
        _case("gqa8-probs-max-ewma-sinks-fp32", 4, 64, 8, 1100, 64, f32, "probs", "max", 0.3, None, None, sinks=True),
    ]
else:
    CASES = [
        _case("mha-probs-mean-fp32-1split", 2, 2, 2, 37, 32, f32, "probs", "mean", 0.0, 1, 16),
        _case("mha-gumbel-sum-ewma-bf16", 2, 2, 2, 45, 32, bf16, "gumbel", "sum", 0.3, 3, 16, True),
        _case("gqa4-probs-max-ewma-fp32", 2, 8, 2, 40, 32, f32, "probs", "max", 0.3, 4, 16),
        _case("gqa4-gumbel-mean-fp32-rank1", 2, 8, 2, 48, 32, f32, "gumbel", "mean", 0.0, 2, 16, True, 2),
        _case("mqa8-probs-sum-bf16", 3, 8, 1, 50, 16, bf16, "probs", "sum", 0.0, 3, 16),
        _case("mqa8-gumbel-max-fp32-1split", 2, 8, 1, 30, 32, f32, "gumbel", "max", 0.0, 1, 16),
        _case("gqa4-probs-mean-fp16-default", 2, 8, 2, 100, 16, f16, "probs", "mean", 0.0, None, None),
        _case("gqa4-out-only-fp32", 2, 8, 2, 40, 32, f32, None, "mean", 0.0, 3, 16),
        _case("mha-out-only-bf16-1split", 2, 2, 2, 20, 32, bf16, None, "mean", 0.0, 1, 16),
        _case("gqa4-tempered-sum-fp32", 2, 8, 2, 40, 32, f32, "tempered", "sum", 0.0, 3, 16),
        _case("gqa4-gumbel-mean-softcap-fp32", 2, 8, 2, 40, 32, f32, "gumbel", "mean", 0.0, 3, 16, softcap=0.5),
        _case("gqa4-out-only-softcap-bf16", 2, 8, 2, 40, 32, bf16, None, "mean", 0.0, 3, 16, softcap=0.5),
        _case("gqa4-probs-mean-sinks-fp32", 2, 8, 2, 40, 32, f32, "probs", "mean", 0.0, 3, 16, sinks=True),
        _case("gqa4-probs-sum-sinks-fp32-1split", 2, 8, 2, 40, 32, f32, "probs", "sum", 0.0, 1, 16, sinks=True),
        _case("gqa4-gumbel-max-ewma-sinks-fp32", 2, 8, 2, 40, 32, f32, "gumbel", "max", 0.3, 3, 16, sinks=True),
        _case("mha-out-only-sinks-bf16", 2, 2, 2, 37, 32, bf16, None, "mean", 0.0, 3, 16, sinks=True),
    ]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _slots(shape, dtype, strided: bool) -> torch.Tensor:
    """A buffer of ``shape`` ``[..., slots, (dim)]``, a view into a larger one when ``strided``."""
    if not strided:
        return torch.empty(shape, dtype=dtype, device=DEVICE)
    big = list(shape)
    big[2] += 5
    return torch.empty(big, dtype=dtype, device=DEVICE)[:, :, 3 : 3 + shape[2]]


def _inputs(c: dict, gen: torch.Generator) -> dict:
    """Random query, slot buffers, positions (about 20% empty slots, one (sequence, KV head) row all empty)."""
    b, hq, hkv, n, d, dtype = c["batch"], c["q_heads"], c["kv_heads"], c["slots"], c["head_dim"], c["dtype"]
    true_pos = torch.stack([torch.randperm(2 * n, generator=gen)[:n] for _ in range(b * hkv)]).view(b, hkv, n)
    query_pos = true_pos.flatten(1).amax(1) + 1
    true_pos[torch.rand(b, hkv, n, generator=gen) < 0.2] = -1
    true_pos[-1, 0] = -1
    positions = _slots((b, hkv, n), torch.int64, c["strided"])
    positions.copy_(true_pos)
    keys = _slots((b, hkv, n, d), dtype, c["strided"])
    values = _slots((b, hkv, n, d), dtype, c["strided"])
    keys.copy_(torch.randn(b, hkv, n, d, generator=gen) * 1.5)
    values.copy_(torch.randn(b, hkv, n, d, generator=gen))
    query = torch.randn(b, 1, hq, d, generator=gen).to(dtype=dtype, device=DEVICE)[:, 0]
    scores = _slots((b, hkv, n), torch.float32, c["strided"])
    scores.copy_(torch.rand(b, hkv, n, generator=gen) * 2.0 / n)
    # sinks around the rows' largest logits (a few units: the scale of q.k / sqrt(d) here), so they weigh
    sinks = (torch.randn(hq, generator=gen) * 2.0 + 2.0).to(DEVICE) if c["sinks"] else None
    return dict(
        sinks=sinks,
        query=query,
        keys=keys,
        values=values,
        positions=positions,
        scores=scores,
        query_pos=query_pos.to(DEVICE),
    )


def _reference(c: dict, x: dict, policy, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attend`` (float32) with the policy's ``step_scores`` and ``accumulate``: output [B, Hq, D], new scores."""
    positions = x["positions"]
    info = StepInfo(LAYER, STEP, x["query_pos"][:, None], positions, TOTAL, c["head_offset"], x["sinks"])
    scorer = None
    if policy is not None:

        def scorer(logits, allowed, rows):
            return policy.step_scores(logits, allowed, info)

    out, step = attend(
        x["query"][:, :, None],
        x["keys"],
        x["values"],
        positions,
        x["query_pos"][:, None],
        scaling,
        softcap=c["softcap"],
        sink_logits=x["sinks"],
        scorer=scorer,
        head_reduce=c["reduce"],
    )
    if policy is None:
        return out[:, 0], None
    acc = CO2Policy(budget=0.5, alpha=c["decay"]) if c["decay"] > 0 else policy
    return out[:, 0], acc.accumulate(x["scores"], step)


@pytest.mark.parametrize("c", CASES)
def test_decode_attention_matches_reference(c: dict) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(c.items())).encode()))
    x = _inputs(c, gen)
    scaling = c["head_dim"] ** -0.5
    seed = 2**40 + int(torch.randint(0, 2**31, (1,), generator=gen))  # bits above 32 must be dropped
    kwargs: dict = dict(
        _num_splits=c["splits"], _block_n=c["block_n"], _poison=True, softcap=c["softcap"], sink_logits=x["sinks"]
    )
    policy = None
    if c["mode"] == "probs":
        policy = H2OPolicy(budget=0.5, head_reduce=c["reduce"])
    elif c["mode"] in ("gumbel", "tempered"):  # tempered: Keyformer's schedule without its noise
        noise = c["mode"] == "gumbel"
        policy = KeyformerPolicy(budget=0.5, head_reduce=c["reduce"], tau_init=1.0, tau_end=2.0, seed=seed, noise=noise)
        tau = policy.temperature(torch.full((c["batch"],), STEP), TOTAL).to(DEVICE)
        kwargs.update(tau=tau, query_pos=x["query_pos"])
    ref_out, ref_scores = _reference(c, x, policy, scaling)

    # Garbage in empty slots must never be read.
    empty = x["positions"] < 0
    x["keys"][empty] = float("nan")
    x["values"][empty] = float("inf")
    scores = None
    if policy is not None:
        scores = x["scores"].clone()
        spec = dataclasses.replace(policy.score_spec(), decay=c["decay"])
        kwargs.update(scores=scores, spec=spec, layer_idx=LAYER, head_offset=c["head_offset"])
    out = decode_attention(x["query"], x["keys"], x["values"], x["positions"], scaling, **kwargs)

    assert out.shape == x["query"].shape and out.dtype == x["query"].dtype
    assert torch.isfinite(out).all(), "output has unwritten (NaN) or non-finite elements"
    assert (out[-1, : c["q_heads"] // c["kv_heads"]] == 0).all(), "a row without any filled slot must give 0"
    tol = THRESHOLD[c["dtype"]]
    err_out = _rel(out, ref_out)
    err_sc = float("nan")
    if scores is not None:
        assert torch.isfinite(scores).all()
        keep = 1.0 - c["decay"]
        err_sc = _rel(scores.double() - keep * x["scores"].double(), ref_scores.double() - keep * x["scores"].double())
        # Empty slots follow the torch formula with a zero step, bit for bit.
        assert torch.equal(scores[empty], ref_scores[empty])
    print(
        f"\n  {DEVICE.type:4s} {c['dtype']!s:15s} B={c['batch']:<2d} Hq={c['q_heads']:<2d} Hkv={c['kv_heads']:<2d} "
        f"C={c['slots']:<5d} D={c['head_dim']:<3d} mode={c['mode']!s:6s} reduce={c['reduce']:4s} "
        f"decay={c['decay']:.1f} splits={c['splits']}  rel.err output {err_out:.2e}  scores {err_sc:.2e}  "
        f"(limit {tol:.0e})"
    )
    assert err_out < tol
    if scores is not None:
        assert err_sc < tol


def test_gumbel_hash_matches_keyformer() -> None:
    """The kernel's hash equals keyformer's bit for bit, its noise ``gumbel_noise`` to float rounding."""
    gen = torch.Generator().manual_seed(7)
    batch, kv_heads, group, slots = 2, 3, 4, 24
    query_pos = torch.randint(0, 5000, (batch,), generator=gen)
    query_pos[0] = 2**35 + 9  # only the low 32 bits count
    key_pos = torch.randint(0, 5000, (batch, kv_heads, slots), generator=gen)
    key_pos[1, 2, 3] = -1
    for seed, offset in ((0, 0), (1, 3), (2**31 + 5, 0), (2**40 + 3, 6)):  # offset: a tensor-parallel rank's heads
        noise_key = mix32(mix32(seed & M32) ^ LAYER)
        hashes, noise = noise_probe(seed, LAYER, kv_heads, group, query_pos.to(DEVICE), key_pos.to(DEVICE), offset)
        # noise.gumbel_noise's hash, step by step
        kv = torch.arange(offset, offset + kv_heads).view(1, kv_heads, 1, 1)
        grp = torch.arange(group).view(1, 1, group, 1)
        h = mix32(mix32(noise_key ^ kv) ^ grp)
        h = mix32(mix32(h ^ (query_pos & M32)[:, None, None, None]) ^ (key_pos & M32)[:, :, None, :])
        assert torch.equal(hashes.cpu(), h)
        ref = gumbel_noise(seed, LAYER, query_pos[:, None], key_pos, kv_heads, group, offset)[:, :, :, 0]
        torch.testing.assert_close(noise.cpu(), ref, rtol=1e-6, atol=1e-6)


def test_gumbel_noise_is_exact_at_the_extremes() -> None:
    """The kernels' noise at the hashes whose ``u`` lies nearest 1 (the largest noise, where ``-log(u)`` is tiny),
    nearest 0, and on both sides of the switch at ``u = 3/4`` between the series and ``lg2``: ``gumbel_noise`` to
    float rounding (a compiled ``lg2`` alone near ``u = 1`` would be off by whole units there)."""
    seed, kv_heads, group = 11, 1, 1
    query_pos = torch.tensor([4321])
    prefix = mix32(mix32(mix32(mix32(mix32(seed & M32) ^ LAYER) ^ 0) ^ 0) ^ 4321)
    candidates = torch.arange(1 << 22)
    top = mix32(prefix ^ candidates) >> 9  # the 23 bits of u
    order = top.argsort()
    switch = (top - 3 * (1 << 21)).abs().argsort()[:16]
    picked = torch.cat([order[:16], order[-32:], switch])
    key_pos = candidates[picked].view(1, 1, -1)
    _, noise = noise_probe(seed, LAYER, kv_heads, group, query_pos.to(DEVICE), key_pos.to(DEVICE))
    ref = gumbel_noise(seed, LAYER, query_pos[:, None], key_pos, kv_heads, group)[:, :, :, 0]
    assert ref.max() > 15 and ref.min() < -2.5  # u within 2^-22 of 1 and of 0 were found
    torch.testing.assert_close(noise.cpu(), ref, rtol=1e-6, atol=2e-6)


def test_rejects_bad_arguments() -> None:
    q = torch.zeros(1, 3, 16, device=DEVICE)
    k = torch.zeros(1, 2, 16, 16, device=DEVICE)
    pos = torch.zeros(1, 2, 16, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, k, k, pos, 1.0)
    q = torch.zeros(1, 2, 16, device=DEVICE)
    scores = torch.zeros(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="score mode"):
        decode_attention(q, k, k, pos, 1.0, scores=scores, spec=ScoreSpec(mode="x"))
    with pytest.raises(ValueError, match="tau"):
        decode_attention(q, k, k, pos, 1.0, scores=scores, spec=ScoreSpec(mode="tempered", noise_seed=0))
    with pytest.raises(ValueError, match=r"sink_logits must be a contiguous \[Hq\] = \[2\], got \(4,\)"):
        decode_attention(q, k, k, pos, 1.0, sink_logits=torch.zeros(4, device=DEVICE))


@pytest.mark.skipif(not CUDA, reason="a GPU's shared memory: the interpreter has no such limit")
def test_float32_keys_too_wide_for_shared_memory_get_a_one_line_error_naming_the_fix() -> None:
    q, k = torch.zeros(1, 2, 256, device=DEVICE), torch.zeros(1, 2, 16, 256, device=DEVICE)
    with pytest.raises(ValueError, match="bfloat16 or float16, or build the cache with kernel='torch'"):
        decode_attention(q, k, k, torch.zeros(1, 2, 16, dtype=torch.int64, device=DEVICE), 1.0)
