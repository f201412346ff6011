"""Policy scores against slow, obviously-correct references, and the reductions between policies."""

import math

import pytest
import torch
from conftest import eager_attention, greedy, random_prompt, tiny_model

import kvkeep
from kvkeep.policies.noise import gumbel_noise

N_PROMPT, STEPS = 20, 3


@pytest.fixture(scope="module")
def gqa_model():
    return tiny_model("llama")  # 4 query heads sharing 2 KV heads


@pytest.fixture(scope="module")
def eager_rows(gqa_model):
    """Eager attention probabilities over prompt + generated tokens, per layer: ``[Hq, rows, rows]``."""
    prompt = random_prompt(N_PROMPT, seed=5)
    generated = greedy(tiny_model("llama"), prompt, new_tokens=STEPS)
    sequence = torch.cat([prompt, generated[:, : STEPS - 1]], dim=1)  # rows fed through the model
    return prompt, eager_attention(sequence)


def _run(model, prompt, policy, **params):
    """Every prompt row scores alike (observe=0): the scores as H2O, Keyformer and CO2 were published."""
    cache = kvkeep.KVKeepCache(model, policy, budget=1000, observe=0, **params)
    greedy(model, prompt, cache, new_tokens=STEPS)
    return cache


def _group_mean(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return per_query_head.view(kv_heads, -1, *per_query_head.shape[1:]).mean(1)


def test_h2o_score_is_column_sum_of_attention(gqa_model, eager_rows):
    prompt, rows = eager_rows
    cache = _run(gqa_model, prompt, "h2o")
    for layer, probs in zip(cache.layers, rows, strict=True):
        reference = _group_mean(probs.sum(1), kv_heads=2)  # [Hkv, tokens]
        assert layer.positions[0, 0].tolist() == list(range(N_PROMPT + STEPS - 1))
        torch.testing.assert_close(layer.scores[0].double(), reference, rtol=1e-5, atol=1e-6)


def test_co2_score_is_ewma_of_step_attention(gqa_model, eager_rows):
    prompt, rows = eager_rows
    alpha = 0.3
    cache = _run(gqa_model, prompt, "co2", alpha=alpha, N=0)
    for layer, probs in zip(cache.layers, rows, strict=True):
        running = alpha * probs[:, :N_PROMPT].sum(1)  # prompt step (all prompt rows)
        for row in range(N_PROMPT, N_PROMPT + STEPS - 1):
            running = (1 - alpha) * running + alpha * probs[:, row]
        torch.testing.assert_close(layer.scores[0].double(), _group_mean(running, 2), rtol=1e-5, atol=1e-6)


def test_keyformer_score_is_gumbel_softmax_with_swept_temperature(gqa_model, eager_rows):
    prompt, rows = eager_rows
    tau_init, tau_end, seed = 1.0, 2.0, 7
    cache = _run(gqa_model, prompt, "keyformer", tau_init=tau_init, tau_end=tau_end, seed=seed)
    total = N_PROMPT + STEPS - 1
    for layer_idx, (layer, probs) in enumerate(zip(cache.layers, rows, strict=True)):
        reference = torch.zeros(4, total, dtype=torch.float64)
        for row in range(total):
            step = max(0, row - N_PROMPT + 1)
            tau = tau_init + step * (tau_end - tau_init) / STEPS
            noise = gumbel_noise(
                seed, layer_idx, torch.tensor([[row]]), torch.arange(total).view(1, 1, -1).expand(1, 2, -1), 2, 2
            )
            noise = noise.view(4, total).double()
            logits = (probs[:, row].clamp_min(1e-300).log() + noise) / tau  # log p = logits - const per row
            logits[:, row + 1 :] = -math.inf
            reference += torch.softmax(logits, dim=-1)
        torch.testing.assert_close(layer.scores[0].double(), _group_mean(reference, 2), rtol=1e-4, atol=1e-5)


def test_keyformer_without_noise_at_unit_temperature_is_h2o(gqa_model):
    prompt = random_prompt(40, seed=6)
    h2o = kvkeep.KVKeepCache(gqa_model, "h2o", budget=0.5, floor=0, recent_ratio=0.3)
    plain = kvkeep.KVKeepCache(gqa_model, "keyformer", budget=0.5, floor=0, noise=False, tau_init=1.0, tau_end=1.0)
    assert torch.equal(greedy(gqa_model, prompt, h2o, 10), greedy(gqa_model, prompt, plain, 10))
    for a, b in zip(h2o.layers, plain.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores)


def test_co2_without_decay_or_measurement_is_h2o(gqa_model):
    prompt = random_prompt(40, seed=7)
    h2o = kvkeep.KVKeepCache(gqa_model, "h2o", budget=0.5, floor=0)
    co2 = kvkeep.KVKeepCache(gqa_model, "co2", budget=0.5, floor=0, N=0, alpha=0.0, rho=0.5)
    assert torch.equal(greedy(gqa_model, prompt, h2o, 10), greedy(gqa_model, prompt, co2, 10))
    for a, b in zip(h2o.layers, co2.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.scores, b.scores)


def test_keyformer_noise_off_changes_nothing_but_noise_on_changes_choice(gqa_model):
    prompt = random_prompt(60, seed=8)
    noisy = kvkeep.KVKeepCache(gqa_model, "keyformer", budget=0.3, floor=0, seed=1)
    plain = kvkeep.KVKeepCache(gqa_model, "keyformer", budget=0.3, floor=0, noise=False)
    greedy(gqa_model, prompt, noisy, 4)
    greedy(gqa_model, prompt, plain, 4)
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(noisy.layers, plain.layers, strict=True))


def test_gumbel_noise_is_standard_gumbel_and_reproducible():
    query, keys = torch.arange(64).view(1, 64), torch.arange(512).view(1, 1, 512).expand(1, 4, 512)
    shape = torch.Size([1, 4, 2, 64, 512])
    noise = gumbel_noise(0, 3, query, keys, 4, 2)
    assert noise.shape == shape and torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(noise.std().item() - math.pi / math.sqrt(6)) < 0.01
    assert torch.equal(noise, gumbel_noise(0, 3, query, keys, 4, 2))
    assert not torch.equal(noise, gumbel_noise(1, 3, query, keys, 4, 2))
    # neighbouring heads, rows and keys are uncorrelated
    flat = noise.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01


def test_gumbel_noise_is_finite_at_the_extreme_hashes():
    from kvkeep.policies.noise import uniform

    u = uniform(torch.tensor([0, 1, 2**31, 2**32 - 2, 2**32 - 1]))
    assert bool(((u > 0) & (u < 1)).all())
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_keyformer_is_reproducible_run_to_run(gqa_model):
    prompt = random_prompt(50, seed=9)
    runs = [kvkeep.KVKeepCache(gqa_model, "keyformer", budget=0.4, floor=0, seed=3) for _ in range(2)]
    outs = [greedy(gqa_model, prompt, c, 8) for c in runs]
    assert torch.equal(*outs)
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(*[c.layers for c in runs], strict=True))


@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_head_reduction_of_gqa_scores(gqa_model, eager_rows, reduce):
    prompt, rows = eager_rows
    cache = _run(gqa_model, prompt, "h2o", head_reduce=reduce)
    for layer, probs in zip(cache.layers, rows, strict=True):
        # the group is reduced once per step (all prompt rows, then each generated row), then accumulated
        steps = [probs[:, :N_PROMPT].sum(1)] + [probs[:, row] for row in range(N_PROMPT, N_PROMPT + STEPS - 1)]
        reduce_group = {"mean": lambda s: s.mean(1), "sum": lambda s: s.sum(1), "max": lambda s: s.amax(1)}[reduce]
        reference = sum(reduce_group(step.view(2, 2, -1)) for step in steps)
        torch.testing.assert_close(layer.scores[0].double(), reference, rtol=1e-5, atol=1e-6)


def test_temperature_schedule():
    policy = kvkeep.make_policy("keyformer", budget=0.5, floor=0, tau_init=1.0, tau_end=2.0)
    assert float(policy.temperature(torch.tensor(0), 100)) == 1.0
    assert float(policy.temperature(torch.tensor(50), 100)) == pytest.approx(1.5)
    assert float(policy.temperature(torch.tensor(100), 100)) == pytest.approx(2.0)
    assert float(policy.temperature(torch.tensor(150), 100)) == pytest.approx(2.0)  # clamped past the end


def test_fp16_and_bf16_scores_are_finite():
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_model("llama").to(dtype)
        prompt = random_prompt(40, seed=11)
        for policy in ("keyformer", "h2o", "co2"):
            cache = (
                kvkeep.KVKeepCache(model, policy, budget=0.5, floor=0, N=2)
                if policy == "co2"
                else kvkeep.KVKeepCache(model, policy, budget=0.5, floor=0)
            )
            greedy(model, prompt, cache, 6)
            for layer in cache.layers:
                assert torch.isfinite(layer.scores).all(), (dtype, policy)
                assert layer.keys.dtype == dtype


def test_prompt_scoring_in_small_row_chunks_equals_one_chunk(gqa_model, monkeypatch):
    import kvkeep.attention as attention

    prompt = random_prompt(48, seed=12)
    whole = kvkeep.KVKeepCache(gqa_model, "keyformer", budget=0.5, floor=0)
    out_whole = greedy(gqa_model, prompt, whole, 5)
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 4 * 48 * 5)  # 5 query rows per chunk
    chunked = kvkeep.KVKeepCache(gqa_model, "keyformer", budget=0.5, floor=0)
    assert torch.equal(greedy(gqa_model, prompt, chunked, 5), out_whole)
    for a, b in zip(whole.layers, chunked.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores)
