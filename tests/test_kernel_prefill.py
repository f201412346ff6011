"""The Triton prefill-score kernels against the torch reference: ``attend`` with the real policies' scores.

Without CUDA the kernels run in Triton's interpreter on small CPU tensors (conftest sets
``TRITON_INTERPRET`` before anything imports triton); with CUDA on the GPU with larger shapes.
Each case prints a row of relative errors (``pytest -s`` shows the table).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import require_triton

CUDA = torch.cuda.is_available()

require_triton()

from kvkeep.attention import attend  # noqa: E402
from kvkeep.kernels.prefill import prefill_scores, prompt_lse  # noqa: E402
from kvkeep.policies import H2OPolicy, KeyformerPolicy, ScoreSpec, StepInfo  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
LAYER = 5
THRESHOLD = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _case(name, batch, q_heads, kv_heads, n, head_dim, dtype, mode, reduce, blocks=None, **opts):
    """``opts``: ``head_cols`` (per-KV-head key columns), ``holes`` (random padding keys and rows),
    ``no_real`` / ``no_pad`` (leave ``query_real`` / ``padding`` out: then there is no padding), ``tau``,
    ``offset`` (the model's index of KV head 0: a tensor-parallel rank's heads), ``first`` (the observation
    window: rows before it score nothing), ``sinks`` (learned sink logits, gpt-oss)."""
    c = dict(batch=batch, q_heads=q_heads, kv_heads=kv_heads, n=n, head_dim=head_dim, dtype=dtype, mode=mode)
    c.update(reduce=reduce, blocks=blocks, head_cols=False, holes=False, no_real=False, no_pad=False, tau=1.0)
    c.update(offset=0, first=0, sinks=False)
    c.update(opts)
    return pytest.param(c, id=name)


if CUDA:
    CASES = [
        _case("mha-probs-mean-bf16", 4, 32, 32, 1500, 128, bf16, "probs", "mean"),
        _case("mha-gumbel-sum-fp32", 2, 32, 32, 1100, 128, f32, "gumbel", "sum", head_cols=True, tau=1.5),
        _case("gqa4-probs-max-bf16", 4, 32, 8, 1200, 128, bf16, "probs", "max", holes=True),
        _case("gqa4-gumbel-mean-bf16-rank1", 4, 32, 8, 1500, 128, bf16, "gumbel", "mean", head_cols=True, offset=8),
        _case("gqa4-gumbel-max-fp32", 1, 32, 8, 1000, 128, f32, "gumbel", "max", holes=True),
        _case("mqa8-probs-sum-fp32", 3, 8, 1, 1300, 128, f32, "probs", "sum"),
        _case("mqa8-gumbel-mean-bf16", 2, 8, 1, 1337, 128, bf16, "gumbel", "mean", holes=True, tau=0.7),
        _case("gqa4-probs-mean-fp16-d96", 2, 32, 8, 777, 96, f16, "probs", "mean"),
        _case("gqa4-probs-sum-bf16-short", 4, 32, 8, 50, 128, bf16, "probs", "sum"),
        _case("mha-gumbel-mean-bf16-nopad", 2, 32, 32, 600, 128, bf16, "gumbel", "mean", no_real=True, no_pad=True),
        _case("gqa4-gumbel-mean-bf16-observe32", 2, 32, 8, 3000, 128, bf16, "gumbel", "mean", first=2968),
        _case("gqa4-probs-mean-bf16-observe200", 3, 32, 8, 1500, 128, bf16, "probs", "mean", holes=True, first=1300),
        _case("gqa8-probs-mean-bf16-sinks", 4, 64, 8, 1500, 64, bf16, "probs", "mean", holes=True, sinks=True),
        _case("gqa8-gumbel-sum-bf16-sinks", 2, 64, 8, 1200, 64, bf16, "gumbel", "sum", sinks=True),
        _case("gqa8-probs-max-fp32-sinks-observe", 2, 64, 8, 1000, 64, f32, "probs", "max", first=900, sinks=True),
    ]
else:
    CASES = [
        _case("mha-probs-mean-fp32", 2, 2, 2, 45, 32, f32, "probs", "mean", (32, 16)),
        _case("mha-gumbel-sum-bf16", 2, 2, 2, 50, 32, bf16, "gumbel", "sum", (32, 16), head_cols=True, tau=1.5),
        _case("gqa4-probs-max-fp32", 2, 8, 2, 40, 32, f32, "probs", "max", (32, 16), head_cols=True, holes=True),
        _case("gqa4-gumbel-mean-fp32-rank1", 3, 8, 2, 37, 32, f32, "gumbel", "mean", (32, 16), holes=True, offset=2),
        _case("gqa4-gumbel-max-bf16", 2, 8, 2, 48, 16, bf16, "gumbel", "max", (16, 16), tau=0.7),
        _case("mqa8-probs-sum-bf16", 2, 8, 1, 33, 16, bf16, "probs", "sum", (32, 16), holes=True),
        _case("mqa4-gumbel-sum-fp32", 2, 4, 1, 41, 32, f32, "gumbel", "sum", (32, 16), head_cols=True),
        _case("gqa4-probs-mean-fp16-d24", 2, 8, 2, 30, 24, f16, "probs", "mean", (32, 16)),
        _case("gqa2-gumbel-mean-fp32-short-default", 2, 4, 2, 7, 16, f32, "gumbel", "mean"),
        _case("mha-probs-sum-fp32-nopad", 2, 2, 2, 20, 16, f32, "probs", "sum", (16, 16), no_real=True, no_pad=True),
        _case("mha-gumbel-max-fp32-nopad", 1, 2, 2, 24, 16, f32, "gumbel", "max", (16, 16), no_real=True, no_pad=True),
        _case("gqa4-gumbel-mean-fp32-observe", 3, 8, 2, 45, 32, f32, "gumbel", "mean", (32, 16), holes=True, first=21),
        _case("gqa4-probs-sum-fp32-observe-last-block", 2, 8, 2, 45, 16, f32, "probs", "sum", (32, 16), first=40),
        _case("mha-probs-fp32-observe-nopad", 1, 2, 2, 40, 16, f32, "probs", "mean", None, no_real=True, first=33),
        _case("gqa4-probs-mean-fp32-sinks", 2, 8, 2, 45, 32, f32, "probs", "mean", (32, 16), holes=True, sinks=True),
        _case("gqa4-probs-sum-bf16-sinks-obs", 2, 8, 2, 40, 16, bf16, "probs", "sum", (32, 16), first=21, sinks=True),
        _case("gqa4-gumbel-max-fp32-sinks", 2, 8, 2, 37, 32, f32, "gumbel", "max", (32, 16), sinks=True),
    ]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _inputs(c: dict, gen: torch.Generator) -> dict:
    """Random prompt: left padding per sequence (one without), optionally padding holes inside the prompt."""
    b, hq, hkv, n, d, dtype = c["batch"], c["q_heads"], c["kv_heads"], c["n"], c["head_dim"], c["dtype"]
    if c["no_real"]:
        padding = torch.zeros(b, dtype=torch.int64)
    else:
        padding = torch.randint(1, max(2, n // 3), (b,), generator=gen)
        padding[0] = 0
    cols = torch.arange(n)
    real = cols[None, :] >= padding[:, None]  # [B, n]
    if c["holes"]:  # padding tokens inside the prompt too (a real row may then see no key at all)
        real &= torch.rand(b, n, generator=gen) > 0.15
    key_heads = hkv if c["head_cols"] else 1
    valid = real[:, None, :].expand(b, key_heads, n).clone()
    if c["head_cols"]:  # per-head key columns: a few more keys dropped in some heads
        valid &= torch.rand(b, key_heads, n, generator=gen) > 0.1
    key_cols = torch.where(valid, cols, -1)
    query = torch.randn(b, n, hq, d, generator=gen).to(dtype).transpose(1, 2)  # [B, Hq, n, D], strided like a model's
    keys = (torch.randn(b, hkv, n, d, generator=gen) * 1.5).to(dtype)
    sinks = (torch.randn(hq, generator=gen) * 2.0 + 2.0).to(DEVICE) if c["sinks"] else None  # they weigh: logits ~ 2
    return dict(
        sinks=sinks,
        query=query.to(DEVICE),
        keys=keys.to(DEVICE),
        key_cols=key_cols.to(DEVICE),
        real=real.to(DEVICE),
        padding=padding.to(DEVICE),
    )


def _reference(c: dict, x: dict, policy, scaling: float) -> torch.Tensor:
    """``attend`` (float32) with the policy's ``step_scores``, exactly as ``KVKeepCache`` scores the prompt."""
    n, pad, key_cols = c["n"], x["padding"], x["key_cols"]
    cols = torch.arange(n, device=DEVICE)
    query_pos = cols[None, :] - pad[:, None]
    if not c["no_real"]:  # padding rows (and holes) attend to nothing and score nothing
        query_pos = torch.where(x["real"], query_pos, -1)
    query_pos = torch.where(cols[None, :] >= c["first"], query_pos, -1)  # rows before the window: nothing
    key_pos = torch.where(key_cols >= 0, key_cols - pad[:, None, None], -1)

    def scorer(logits, allowed, rows):
        info = StepInfo(LAYER, 0, query_pos[:, rows], key_pos, head_offset=c["offset"], sink_logits=x["sinks"])
        return policy.step_scores(logits, allowed, info)

    _, scores = attend(
        x["query"].float(),
        x["keys"].float(),
        x["keys"].float(),
        key_pos,
        query_pos,
        scaling,
        sink_logits=x["sinks"],
        scorer=scorer,
        head_reduce=c["reduce"],
    )
    return scores


def _row_lse(c: dict, x: dict, scaling: float) -> torch.Tensor:
    """``[B, Hq, n]`` natural log-sum-exp of each row's scaled logits over its allowed keys (float64 logits, one
    sequence at a time), +inf for a row without any: what flash attention hands ``prefill_scores``."""
    group = c["q_heads"] // c["kv_heads"]
    rows = torch.arange(c["n"], device=DEVICE)
    out = []
    for b in range(c["batch"]):
        keys = x["keys"][b].double().repeat_interleave(group, 0)  # [Hq, n, D]
        cols = x["key_cols"][b].expand(c["kv_heads"], -1).repeat_interleave(group, 0)[:, None, :]  # [Hq, 1, n]
        logits = torch.matmul(x["query"][b].double(), keys.transpose(1, 2)) * scaling
        allowed = (cols >= 0) & (cols <= rows[:, None])
        lse = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), -1)
        out.append(torch.where(torch.isneginf(lse), float("inf"), lse).float())
    return torch.stack(out)


@pytest.mark.parametrize("given_lse", [False, True], ids=["two-pass", "given-lse"])
@pytest.mark.parametrize("c", CASES)
def test_prefill_scores_match_reference(c: dict, given_lse: bool) -> None:
    """``given_lse``: each row's log-sum-exp handed in (as the flash kernel's), so only the column-sum pass runs."""
    if given_lse and c["mode"] != "probs":
        pytest.skip("a given log-sum-exp serves a probability score only")
    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(c.items())).encode()))
    x = _inputs(c, gen)
    scaling = c["head_dim"] ** -0.5
    seed = 2**40 + int(torch.randint(0, 2**31, (1,), generator=gen))  # bits above 32 must be dropped
    if c["mode"] == "probs":
        policy = H2OPolicy(budget=0.5, head_reduce=c["reduce"])
        kwargs: dict = {}
    else:
        policy = KeyformerPolicy(budget=0.5, head_reduce=c["reduce"], tau_init=c["tau"], tau_end=3.0, seed=seed)
        kwargs = dict(tau=float(policy.temperature(torch.tensor(0), None)))
        if not c["no_pad"]:
            kwargs["padding"] = x["padding"]
    ref = _reference(c, x, policy, scaling)
    if given_lse:
        kwargs["lse"] = _row_lse(c, x, scaling)

    # Padding keys and padding query rows are never read: poison them.
    key_cols = x["key_cols"]
    bad_keys = (key_cols < 0).expand(-1, c["kv_heads"], -1)
    x["keys"][bad_keys] = float("nan")
    if not c["no_real"]:
        x["query"].transpose(1, 2)[~x["real"]] = float("nan")
        kwargs["query_real"] = x["real"]
    if c["first"]:  # rows before the observation window are never read either
        x["query"][:, :, : c["first"]] = float("nan")
        kwargs["first_row"] = c["first"]
    out = prefill_scores(
        x["query"],
        x["keys"],
        key_cols,
        scaling,
        spec=policy.score_spec(),
        layer_idx=LAYER,
        head_offset=c["offset"],
        sink_logits=x["sinks"],
        _blocks=c["blocks"],
        _poison=True,
        **kwargs,
    )

    assert out.shape == (c["batch"], c["kv_heads"], c["n"]) and out.dtype == torch.float32
    assert torch.isfinite(out).all(), "scores have unwritten (NaN) or non-finite elements"
    assert (out[bad_keys] == 0).all(), "padding keys must score 0"
    tol = THRESHOLD[c["dtype"]]
    err = _rel(out, ref)
    print(
        f"\n  {DEVICE.type:4s} {c['dtype']!s:14s} B={c['batch']:<2d} Hq={c['q_heads']:<2d} Hkv={c['kv_heads']:<2d} "
        f"n={c['n']:<5d} D={c['head_dim']:<3d} mode={c['mode']:6s} reduce={c['reduce']:4s} "
        f"blocks={c['blocks']!s:8s}  rel.err scores {err:.2e}  (limit {tol:.0e})"
    )
    assert err < tol


def test_rejects_bad_arguments() -> None:
    q = torch.zeros(1, 3, 16, 16, device=DEVICE)
    k = torch.zeros(1, 2, 16, 16, device=DEVICE)
    cols = torch.arange(16, device=DEVICE).view(1, 1, 16)
    probs = ScoreSpec()
    with pytest.raises(ValueError, match="multiple"):
        prefill_scores(q, k, cols, 1.0, spec=probs)
    q = torch.zeros(1, 2, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="keys"):
        prefill_scores(q, k[:, :, :8], cols, 1.0, spec=probs)
    with pytest.raises(ValueError, match="key_cols"):
        prefill_scores(q, k, cols[..., :8], 1.0, spec=probs)
    with pytest.raises(ValueError, match="score mode"):
        prefill_scores(q, k, cols, 1.0, spec=ScoreSpec(mode="x"))
    with pytest.raises(ValueError, match="head_reduce"):
        prefill_scores(q, k, cols, 1.0, spec=ScoreSpec(head_reduce="median"))
    with pytest.raises(ValueError, match="lse"):
        prefill_scores(q, k, cols, 1.0, spec=ScoreSpec(mode="tempered"), tau=1.0, lse=torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="query_real"):
        prefill_scores(q, k, cols, 1.0, spec=probs, query_real=torch.ones(1, 8, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"sink_logits \(3,\) must be \[Hq\] = \[2\]"):
        prefill_scores(q, k, cols, 1.0, spec=probs, sink_logits=torch.zeros(3, device=DEVICE))


@pytest.mark.parametrize("c", [CASES[2], CASES[5]], ids=lambda c: c["mode"] + ("-holes" if c["holes"] else ""))
def test_prompt_lse_is_each_rows_logsumexp_over_the_keys_it_attends(c: dict) -> None:
    """``prompt_lse``: the log-sum-exp that turns SDPA's output into a learned sink's (``sigmoid(lse - sink)``)."""
    x = _inputs(c, torch.Generator().manual_seed(3))
    scaling = c["head_dim"] ** -0.5
    group = c["q_heads"] // c["kv_heads"]
    lse = prompt_lse(x["query"], x["keys"], x["key_cols"], scaling, query_real=x["real"])
    logits = x["query"].double() @ x["keys"].double().repeat_interleave(group, 1).transpose(-1, -2) * scaling
    cols = torch.arange(c["n"], device=DEVICE)
    key_cols = x["key_cols"].repeat_interleave(group, 1) if c["head_cols"] else x["key_cols"]
    allowed = (key_cols[:, :, None, :] >= 0) & (key_cols[:, :, None, :] <= cols[:, None])
    allowed = allowed.expand(-1, c["q_heads"], -1, -1)
    ref = logits.masked_fill(~allowed, float("-inf")).logsumexp(-1)
    rows = x["real"][:, None, :].expand_as(ref) & allowed.any(-1)
    assert torch.isinf(lse[~allowed.any(-1)]).all()  # a row without any key: +inf, so sigmoid(lse - sink) = 1
    torch.testing.assert_close(lse[rows].double(), ref[rows], rtol=THRESHOLD[c["dtype"]], atol=1e-3)
