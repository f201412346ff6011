"""Every supported architecture: equivalence with full attention, batching, compression, positions."""

import warnings

import pytest
import torch
from conftest import ARCHS, COVERING, HALF, greedy, left_pad, random_prompt, tiny_model

import kvkeep
from kvkeep.hf import with_cache


@pytest.mark.parametrize("arch", ARCHS)
def test_full_policy_matches_transformers_default_attention(arch, get_model):
    model = get_model(arch)
    prompt = random_prompt(30, seed=1)
    reference = greedy(tiny_model(arch), prompt)  # a fresh copy: transformers' own attention and cache
    assert torch.equal(greedy(model, prompt, kvkeep.KVKeepCache(model, "full")), reference)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", list(COVERING))
def test_covering_budget_reproduces_full_attention(arch, policy, get_model):
    model = get_model(arch)
    prompt = random_prompt(30, seed=2)
    full = greedy(model, prompt, kvkeep.KVKeepCache(model, "full"), new_tokens=12)
    cache = kvkeep.KVKeepCache(model, policy, **COVERING[policy])
    assert torch.equal(greedy(model, prompt, cache, new_tokens=12), full)
    assert all(layer["evicted"] == 0 for layer in cache.stats() if layer["sliding_window"] is None)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", list(HALF))
def test_batched_generation_equals_per_prompt(arch, policy, get_model):
    model = get_model(arch)
    prompts = [random_prompt(n, seed=10 + n)[0] for n in (24, 40, 31)]
    ids, mask = left_pad(prompts)
    batch_cache = kvkeep.KVKeepCache(model, policy, **HALF[policy])
    batched = greedy(model, ids, batch_cache, new_tokens=8, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], kvkeep.KVKeepCache(model, policy, **HALF[policy]), new_tokens=8)
        assert torch.equal(alone[0], batched[row]), f"sequence {row} differs when batched"
    # each sequence kept its own budget, and padding was never kept
    for layer in batch_cache.stats():
        if layer["budget"] is not None:
            assert layer["kept"] == layer["budget"]


@pytest.mark.parametrize("arch", ARCHS)
def test_half_budget_shrinks_cache(arch, get_model):
    model = get_model(arch)
    prompt = random_prompt(40, seed=3)
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    greedy(model, prompt, cache, new_tokens=6)
    assert cache.nbytes() < 0.6 * cache.full_nbytes()


# Positions: after window compression, the next step must equal a fresh run on exactly the kept tokens with
# their original positions.  One layer, so the kept keys/values do not depend on evicted tokens.
POSITION_ARCHS = ["llama", "qwen3", "gpt2", "opt", "gpt_neox", "gptj", "mpt", "phi3"]


@pytest.mark.parametrize("arch", POSITION_ARCHS)
def test_first_decode_step_after_window_compression_sees_true_positions(arch):
    model = tiny_model(arch, layers=1)
    n, k = 30, 12
    prompt = random_prompt(n, seed=4)
    cache = kvkeep.KVKeepCache(model, "window", budget=k)
    with torch.no_grad():
        first = model(prompt, **with_cache(model, cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        step = model(
            first, **with_cache(model, cache), attention_mask=torch.ones(1, n + 1, dtype=torch.long), use_cache=True
        ).logits[:, -1]
        kept = torch.cat([prompt[:, n - k :], first], dim=1)
        kwargs = {"position_ids": torch.arange(n - k, n + 1)[None]}
        if arch == "mpt":  # ALiBi: only distances matter, and the kept window is contiguous
            kwargs = {}
        reference = model(kept, **kwargs).logits[:, -1]
    assert cache.layers[0].positions.tolist()[0][0] == list(range(n - k + 1, n + 1))
    torch.testing.assert_close(step, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old_name", [False, True], ids=["cache-arg", "past_key_values"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_stores_the_prompt_in_the_cache_it_was_given(arch, old_name, get_model):
    """Fails loudly if an adapter's (or the model's) forward ever runs without the cache it was given."""
    model = get_model(arch)
    cache = kvkeep.KVKeepCache(model, "full")
    prompt = random_prompt(17, seed=5)
    kwargs = {"past_key_values": cache} if old_name else with_cache(model, cache)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name is deprecated from transformers 5.24
        model(prompt, use_cache=True, **kwargs)
    assert [layer.get_seq_length() for layer in cache.layers] == [17] * len(cache.layers)
    assert all(layer.nbytes() > 0 for layer in cache.layers)
