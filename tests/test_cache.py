"""Cache invariants, memory, and the one-line errors users get for bad input."""

import pytest
import torch
import transformers as tf
from conftest import greedy, left_pad, random_prompt, tiny_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicCache

import kvkeep
from kvkeep.hf import with_cache

MODEL = tiny_model("llama")  # GQA: 4 query heads, 2 KV heads, 2 layers


def _step(model, cache, token, length):
    with torch.no_grad():
        logits = model(token, **with_cache(MODEL, cache), attention_mask=torch.ones(1, length, dtype=torch.long)).logits
    return logits[:, -1:].argmax(-1)


def _kept(layer) -> list[list[set[int]]]:
    """Per sequence and KV head, the set of kept columns."""
    return [[set(c for c in head if c >= 0) for head in row] for row in layer.positions.tolist()]


POLICY_PARAMS = st.sampled_from(
    [
        ("window", {}),
        ("streaming", {"sinks": 4}),
        ("h2o", {"recent_ratio": 0.5}),
        ("h2o", {"recent_ratio": 0.0, "sinks": 2}),
        ("keyformer", {"recent_ratio": 0.3, "max_new_tokens": 12}),
        ("keyformer", {"recent_ratio": 0.2, "tau_end": 3.0, "max_new_tokens": 5}),
        ("co2", {"alpha": 0.2, "N": 0, "rho": 0.25}),
        ("co2", {"alpha": 0.0, "N": 3, "rho": 0.5}),
    ]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # a budget that covers a static cache's whole generation: the cache never needs to evict
    choice=("keyformer", {"recent_ratio": 0.2, "tau_end": 3.0, "max_new_tokens": 5}),
    prompt_len=8, budget=12, steps=5, seed=0, static=True,
)  # fmt: skip
@given(
    choice=POLICY_PARAMS,
    prompt_len=st.integers(8, 60),
    budget=st.one_of(st.floats(0.3, 1.0), st.integers(8, 40)),
    steps=st.integers(1, 12),
    seed=st.integers(0, 1000),
    static=st.booleans(),
)
def test_kept_set_invariants(choice, prompt_len, budget, steps, seed, static):
    policy, params = choice
    cache = kvkeep.KVKeepCache(MODEL, policy, budget=budget, static=static, **params)
    spec = cache.policy
    k = spec.budget_tokens(prompt_len)
    if spec.sinks + spec.recent_size(k) > k or prompt_len < spec.sinks:
        with pytest.raises(ValueError):
            greedy(MODEL, random_prompt(prompt_len, seed), cache, 1)
        return
    if static and "max_new_tokens" in params:  # a generation of N new tokens feeds N - 1 of them back
        steps = min(steps, params["max_new_tokens"] - 1)
    prompt = random_prompt(prompt_len, seed)
    with torch.no_grad():
        token = MODEL(prompt, **with_cache(MODEL, cache)).logits[:, -1:].argmax(-1)
    before = [_kept(layer) for layer in cache.layers]
    for t in range(1, steps + 1):
        newest = prompt_len + t - 1
        token = _step(MODEL, cache, token, newest + 1)
        cache.end_measurement()  # as kvkeep.generate after each step: a static CO2 cache is cut after its N-th step
        for idx, layer in enumerate(cache.layers):
            assert layer.get_seq_length() == newest + 1
            kept = _kept(layer)
            for head, old in zip(kept[0], before[idx][0], strict=True):
                if spec.recent_size(k) >= 1:
                    assert newest in head  # the new token sits at its true position
                assert head <= old | {newest}  # an evicted token never returns
                limited = t >= spec.evict_after()
                if limited:
                    assert len(head) <= k  # never over budget
                    recent = set(range(max(0, newest + 1 - spec.recent_size(k)), newest + 1))
                    assert recent <= head  # the recent window is always kept
                else:
                    assert len(head) == newest + 1  # CO2 measures before it evicts
                assert set(range(min(spec.sinks, newest + 1))) <= head  # sinks are always kept
            before[idx] = kept


def test_kv_bytes_drop_at_half_budget_and_stay_constant():
    prompt = random_prompt(64, seed=1)
    for policy in ("window", "streaming", "h2o", "keyformer", "co2"):
        params = {"N": 0} if policy == "co2" else {"max_new_tokens": 8} if policy == "keyformer" else {}
        cache = kvkeep.KVKeepCache(MODEL, policy, budget=0.5, floor=0, **params)
        with torch.no_grad():
            token = MODEL(prompt, **with_cache(MODEL, cache)).logits[:, -1:].argmax(-1)
        after_prefill = cache.nbytes()
        assert after_prefill <= 0.55 * cache.full_nbytes(), policy
        for t in range(1, 8):
            token = _step(MODEL, cache, token, 64 + t)
            assert cache.nbytes() == after_prefill, policy
        layer = cache.layers[0]
        assert layer.keys.shape[2] == 32 and layer.values.shape[2] == 32  # physically 32 slots, not masked


def test_co2_keeps_everything_for_N_steps_then_cuts_to_budget():
    prompt = random_prompt(40, seed=2)
    cache = kvkeep.KVKeepCache(MODEL, "co2", budget=0.5, floor=0, N=4)
    with torch.no_grad():
        token = MODEL(prompt, **with_cache(MODEL, cache)).logits[:, -1:].argmax(-1)
    sizes = []
    for t in range(1, 7):
        token = _step(MODEL, cache, token, 40 + t)
        sizes.append(cache.layers[0].keys.shape[2])
    assert sizes == [41, 42, 43, 20, 20, 20]


def test_padding_is_never_kept_and_each_sequence_has_its_budget():
    prompts = [random_prompt(n, seed=n)[0] for n in (10, 30)]
    ids, mask = left_pad(prompts)
    cache = kvkeep.KVKeepCache(MODEL, "h2o", budget=0.5, floor=0)
    with torch.no_grad():
        MODEL(ids, attention_mask=mask, **with_cache(MODEL, cache))
    for layer in cache.layers:
        assert layer.budget.tolist() == [5, 15]
        short, long = _kept(layer)
        assert all(head <= set(range(10)) and len(head) == 5 for head in short)  # true positions of real tokens
        assert (layer.positions[0] >= 0).sum(-1).tolist() == [5, 5]  # no slot holds one of the 20 padding columns
        assert all(len(head) == 15 for head in long)
        assert layer.padding.tolist() == [20, 0]


def test_stats_and_nbytes_report_what_is_held():
    cache = kvkeep.KVKeepCache(MODEL, "window", budget=10)
    greedy(MODEL, random_prompt(30, seed=3), cache, 5)
    stats = cache.stats()
    assert len(stats) == 2
    assert stats[0]["kept"] == [10] and stats[0]["budget"] == [10] and stats[0]["seen"] == 34
    assert stats[0]["evicted"] == (34 - 10) * 2  # per KV head
    expected = 2 * 2 * (1 * 2 * 10 * 16 * 4)  # layers x (K and V) x [batch, heads, slots, dim] float32
    assert cache.nbytes() == expected == sum(s["bytes"] for s in stats)
    assert cache.full_nbytes() == expected * 34 // 10


def test_gemma3_sliding_layers_keep_native_window_and_policy_applies_to_global_layers():
    model = tiny_model("gemma3")  # sliding_window=12, layers: sliding, full, sliding, full
    cache = kvkeep.KVKeepCache(model, "window", budget=8)
    greedy(model, random_prompt(40, seed=4), cache, 3)
    for layer in cache.stats():
        if layer["sliding_window"] is not None:
            assert layer["policy"] == "full" and layer["kept"] == [11]  # the native window - 1
        else:
            assert layer["policy"] == "window" and layer["kept"] == [8]


def test_reset_allows_reuse_and_reuse_without_reset_is_an_error():
    cache = kvkeep.KVKeepCache(MODEL, "h2o", budget=0.5, floor=0)
    first = greedy(MODEL, random_prompt(30, seed=5), cache, 4)
    with pytest.raises(ValueError, match="reset"):
        greedy(MODEL, random_prompt(20, seed=6), cache, 4)
    cache.reset()
    assert torch.equal(greedy(MODEL, random_prompt(30, seed=5), cache, 4), first)


def test_batch_size_change_is_an_error():
    cache = kvkeep.KVKeepCache(MODEL, "window", budget=0.5, floor=0)
    greedy(MODEL, random_prompt(30, seed=5), cache, 2)
    ids, mask = left_pad([random_prompt(20, seed=1)[0]] * 2)
    with pytest.raises(ValueError, match="reset"):
        greedy(MODEL, ids, cache, 2, attention_mask=mask)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(policy="nope", budget=0.5), "unknown policy 'nope'"),
        (dict(policy="h2o", budget=0.0), "outside (0, 1]"),
        (dict(policy="h2o", budget=1.5), "outside (0, 1]"),
        (dict(policy="h2o", budget=-3), "< 1"),
        (dict(policy="h2o"), "needs a budget"),
        (dict(policy="full", budget=0.5), "takes no budget"),
        (dict(policy="streaming", budget=3), "smaller than sinks"),
        (dict(policy="h2o", budget=4, sinks=4, recent_ratio=0.5), "smaller than sinks"),
        (dict(policy="co2", budget=0.5, alpha=-0.1), "alpha"),
        (dict(policy="co2", budget=0.5, N=-1), "N (measurement steps)"),
        (dict(policy="keyformer", budget=0.5, tau_init=2.0, tau_end=1.0), "tau_end"),
        (dict(policy="keyformer", budget=0.5, tau_init=0.0), "tau_init"),
        (dict(policy="h2o", budget=0.5, recent_ratio=1.5), "recent_ratio"),
        (dict(policy="h2o", budget=0.5, head_reduce="median"), "head_reduce"),
        (dict(policy="window", budget=0.5, temperature=3), "has no parameter temperature"),
    ],
)
def test_bad_input_gives_one_line_error_naming_the_fix(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        kvkeep.KVKeepCache(MODEL, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_ratio_budget_too_small_for_prompt_and_prompt_shorter_than_sinks():
    cache = kvkeep.KVKeepCache(MODEL, "streaming", budget=0.1, floor=0)  # 0.1 x 30 = 3 tokens < 4 sinks
    with pytest.raises(ValueError, match="smaller than sinks"):
        greedy(MODEL, random_prompt(30), cache, 1)
    cache = kvkeep.KVKeepCache(MODEL, "streaming", budget=1.0)
    with pytest.raises(ValueError, match="shorter than the 4 attention sinks"):
        greedy(MODEL, random_prompt(3), cache, 1)


def test_an_architecture_kvkeep_cannot_run_is_refused_with_the_reason():
    model = tf.AutoModelForCausalLM.from_config(tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="'bloom': BloomForCausalLM computes attention in its own module") as info:
        kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    assert "\n" not in str(info.value)


def test_keyformer_outside_generate_needs_schedule_length():
    cache = kvkeep.KVKeepCache(MODEL, "keyformer", budget=0.5, floor=0)
    with torch.no_grad():
        token = MODEL(random_prompt(30), **with_cache(MODEL, cache)).logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError, match="max_new_tokens"):
            _step(MODEL, cache, token, 31)


def test_keyformer_schedule_length_comes_from_the_cache_or_kvkeep_generate():
    cache = kvkeep.KVKeepCache(MODEL, "keyformer", budget=0.5, floor=0, max_new_tokens=7)
    greedy(MODEL, random_prompt(30), cache, 7)
    assert cache.state.max_new_tokens == 7
    cache = kvkeep.KVKeepCache(MODEL, "keyformer", budget=0.5, floor=0)
    kvkeep.generate(MODEL, random_prompt(30), cache=cache, max_new_tokens=5)
    assert cache.state.max_new_tokens == 5


def test_keyformer_in_model_generate_without_its_length_is_a_one_line_error():
    cache = kvkeep.KVKeepCache(MODEL, "keyformer", budget=0.5, floor=0)
    with pytest.raises(ValueError, match="max_new_tokens=N to KVKeepCache") as info:
        MODEL.generate(random_prompt(30), max_new_tokens=4, do_sample=False, pad_token_id=0, **with_cache(MODEL, cache))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_oss"])  # sliding-window layers; learned sinks (eager)
def test_a_model_kvkeep_ran_on_keeps_its_own_attention_and_outputs_outside_a_kvkeep_cache(arch):
    model, twin = tiny_model(arch), tiny_model(arch)  # twin: never touched by kvkeep
    prompt = random_prompt(25, seed=8)
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    kvkeep.generate(model, prompt, cache=cache, max_new_tokens=4)  # kvkeep ran on the model
    own = "eager" if arch == "gpt_oss" else "sdpa"  # SDPA cannot apply gpt-oss's sinks
    assert model.config._attn_implementation == twin.config._attn_implementation == own
    ids = torch.cat([random_prompt(30, seed=1), random_prompt(30, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding

    @torch.no_grad()
    def prompt_then_step(m):
        cache = DynamicCache(config=m.config)
        prompt = m(input_ids=ids, attention_mask=mask, **with_cache(m, cache)).logits
        longer = torch.cat([mask, mask[:, -1:]], 1)
        step = m(input_ids=ids[:, -1:], attention_mask=longer, **with_cache(m, cache)).logits
        return prompt, step

    torch.testing.assert_close(prompt_then_step(model), prompt_then_step(twin), rtol=0, atol=0)  # same kernels
    assert torch.equal(greedy(model, prompt), greedy(twin, prompt))


def test_kvkeep_attention_runs_only_inside_a_kvkeep_forward_and_the_name_survives_an_error():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")  # the user's choice, kept around kvkeep's forwards
    seen = []
    first = model.base_model.layers[0]
    first.self_attn.register_forward_pre_hook(lambda *_: seen.append(model.config._attn_implementation))
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    with torch.no_grad():
        model(random_prompt(20), **with_cache(model, cache))
        model(random_prompt(20))
    assert seen == ["kvkeep", "eager"]

    def boom(*_):
        raise RuntimeError("boom")

    handle = first.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(random_prompt(20), **with_cache(model, kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)))
    handle.remove()
    assert model.config._attn_implementation == "eager"


def test_a_composite_model_whose_decoder_reads_its_text_config_runs_kvkeep_and_keeps_both_names():
    """Fuyu's decoder reads ``config.text_config``: kvkeep's forwards name kvkeep there too, and restore it."""
    import transformers as tf

    text = dict(model_type="persimmon", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=128, max_position_embeddings=256)  # fmt: skip
    config = tf.FuyuConfig(text_config=text, vocab_size=128, hidden_size=32, patch_size=4)
    torch.manual_seed(0)
    model = tf.FuyuForCausalLM(config).eval()
    assert model.config.get_text_config(decoder=True) is not model.config
    prompt = random_prompt(20, seed=3)
    plain = greedy(model, prompt)
    assert torch.equal(greedy(model, prompt, kvkeep.KVKeepCache(model, "full")), plain)
    assert greedy(model, prompt, kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)).shape == plain.shape
    assert model.config._attn_implementation == model.config.text_config._attn_implementation == "sdpa"


def test_forwards_of_one_model_from_two_threads_never_see_each_others_attention():
    import threading

    model = tiny_model("llama")
    prompt = random_prompt(24, seed=5)
    with torch.no_grad():
        plain = model(prompt).logits
    kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    errors = []

    def kvkeep_forwards():
        try:
            for _ in range(10):
                cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
                kvkeep.generate(model, prompt, cache=cache, max_new_tokens=3)
        except Exception as err:  # reported below
            errors.append(err)

    def plain_forwards():
        with torch.no_grad():
            for _ in range(30):
                if not torch.equal(model(prompt).logits, plain):
                    errors.append("a plain forward ran kvkeep's attention")

    threads = [threading.Thread(target=kvkeep_forwards), threading.Thread(target=plain_forwards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_model_kvkeep_ran_on_compiles_without_a_graph_break():
    """transformers compiles the model for its own static caches: kvkeep's hooks must stay out of that graph."""
    import torch._dynamo

    model = tiny_model("llama")
    prompt = random_prompt(20, seed=6)
    kvkeep.generate(model, prompt, cache=kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0), max_new_tokens=3)
    explained = torch._dynamo.explain(lambda ids: model(ids).logits)(prompt)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
