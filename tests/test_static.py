"""Static caches: slot buffers that new tokens overwrite in place, and the graph-ready decode loop.

The slot path must choose exactly the tokens the compacting path chooses (same tokens out, same kept
sets), while its tensors keep their shape and address from step to step.
"""

import pytest
import torch
import transformers as tf
from conftest import COVERING, HALF, TINY_CONFIGS, greedy, left_pad, random_prompt, tiny_model

import kvkeep
from kvkeep.cache import SlotLayer
from kvkeep.decode import DecodeStep
from kvkeep.hf import with_cache

#: Architectures without sliding-window layers (hybrids have their own test below).
STATIC_ARCHS = ["llama", "qwen2", "qwen3", "gpt2", "opt", "gpt_neox", "mpt", "gptj"]


def _batch():
    prompts = [random_prompt(40, seed=1)[0], random_prompt(27, seed=2)[0], random_prompt(33, seed=3)[0]]
    return left_pad(prompts)


def _kept_sets(cache) -> list:
    return [
        [[set(c for c in head if c >= 0) for head in row] for row in layer.positions.tolist()] for layer in cache.layers
    ]


@pytest.mark.parametrize("arch", STATIC_ARCHS)
@pytest.mark.parametrize("policy", list(HALF))
def test_static_slots_choose_what_the_compacting_path_chooses(get_model, arch, policy):
    model = get_model(arch)
    ids, mask = _batch()
    dynamic = kvkeep.KVKeepCache(model, policy, **HALF[policy])
    static = kvkeep.KVKeepCache(model, policy, static=True, kernel="torch", **HALF[policy])
    assert torch.equal(greedy(model, ids, dynamic, 12, mask), greedy(model, ids, static, 12, mask))
    assert static.ready_for_graph()
    assert _kept_sets(static) == _kept_sets(dynamic)
    assert [layer.evicted_entries() for layer in static.layers] == [layer.evicted for layer in dynamic.layers]


@pytest.mark.parametrize("policy", list(COVERING))
def test_static_with_covering_budget_reproduces_full_attention(get_model, policy):
    model = get_model("llama")
    ids, mask = _batch()
    full = kvkeep.generate(model, ids, mask, max_new_tokens=12).tokens  # transformers' DynamicCache
    cache = kvkeep.KVKeepCache(model, policy, static=True, kernel="torch", **COVERING[policy])
    assert torch.equal(kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=12).tokens, full)


@pytest.mark.parametrize("policy", list(HALF))
def test_generate_loop_matches_for_static_and_compacting_caches(get_model, policy):
    model = get_model("qwen2")
    ids, mask = _batch()
    runs = [
        kvkeep.generate(
            model, ids, mask, cache=kvkeep.KVKeepCache(model, policy, static=s, **HALF[policy]), max_new_tokens=10
        )
        for s in (False, True)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].tokens.shape == (3, 10) and runs[1].graph_steps == 0  # no CUDA graph on the CPU
    assert runs[0].prefill_s > 0 and runs[0].decode_s > 0


def test_co2_measures_on_slots_that_hold_the_prompt_then_is_cut_to_its_budget(get_model, monkeypatch):
    """CO2's measurement steps run on slot buffers (fixed shapes and addresses: the fused kernel, a CUDA graph on a
    GPU) holding the whole prompt and N more; after N steps each row is cut to its budget, into budget + 1 slots,
    keeping what the compacting path keeps."""
    model = get_model("llama")
    ids, mask = _batch()  # prompts of 40, 27 and 33 tokens: budgets 20, 13, 16
    params = dict(budget=0.5, N=3, floor=0)
    cache = kvkeep.KVKeepCache(model, "co2", static=True, kernel="torch", **params)
    steps = []

    def on_step(index, logits, tokens):
        layer = cache.layers[0]
        held = (layer.positions >= 0).sum(-1).amax(-1).tolist()
        steps.append((type(layer).__name__, layer.keys.shape[2], held, layer.keys.data_ptr(), cache.ready_for_graph()))

    released = []  # the loop drops its captured step when the cut replaces the buffers
    monkeypatch.setattr(DecodeStep, "release", lambda step: released.append(len(steps)))
    tokens = kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=9, on_step=on_step).tokens
    assert released == [3]  # right after step N, where the compacting path cuts
    assert steps[0][:3] == ("CompactingLayer", 40, [40, 27, 33])  # the prompt, uncut
    measuring, cut = steps[1:3], steps[3:]
    assert [s[:3] for s in measuring] == [("SlotLayer", 40 + 3 + 1, [40 + t, 27 + t, 33 + t]) for t in (1, 2)]
    assert len({s[3] for s in measuring}) == 1 and all(s[4] for s in measuring)  # one address: a graph replays it
    assert [s[:3] for s in cut] == [("SlotLayer", 21, [20, 13, 16])] * 6
    assert len({s[3] for s in cut}) == 1 and all(s[4] for s in cut) and not cache.measuring
    compacting = kvkeep.KVKeepCache(model, "co2", **params)
    assert torch.equal(kvkeep.generate(model, ids, mask, cache=compacting, max_new_tokens=9).tokens, tokens)
    assert _kept_sets(cache) == _kept_sets(compacting)
    assert cache.stats()[0]["evicted"] == compacting.stats()[0]["evicted"]


@pytest.mark.parametrize("new_tokens", [3, 4])  # CO2 (N = 3) still measures at the end, or is cut at its last step
def test_co2_generation_that_ends_by_its_cut_keeps_what_the_compacting_path_keeps(get_model, new_tokens):
    model = get_model("llama")
    ids, mask = _batch()
    caches = [kvkeep.KVKeepCache(model, "co2", static=s, kernel="torch", **HALF["co2"]) for s in (False, True)]
    runs = [kvkeep.generate(model, ids, mask, cache=c, max_new_tokens=new_tokens).tokens for c in caches]
    assert torch.equal(runs[0], runs[1]) and _kept_sets(caches[1]) == _kept_sets(caches[0])
    assert caches[1].sequence_bytes() == caches[0].sequence_bytes()
    # the slots peak after step N, before the cut; the compacting path cuts inside that step, so it peaks one
    # token lower
    token = sum(layer.token_bytes() for layer in caches[1].layers) * (new_tokens == 4)
    assert caches[1].peak_sequence_bytes() == [peak + token for peak in caches[0].peak_sequence_bytes()]


def test_slot_buffers_keep_shape_address_and_bytes_while_decoding():
    model = tiny_model("llama")
    prompt = random_prompt(64, seed=1)
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0, static=True)
    with torch.no_grad():
        token = model(prompt, **with_cache(model, cache)).logits[:, -1:].argmax(-1)
        token = (
            model(token, **with_cache(model, cache), attention_mask=torch.ones(1, 65, dtype=torch.long))
            .logits[:, -1:]
            .argmax(-1)
        )
    layer = cache.layers[0]
    assert isinstance(layer, SlotLayer) and layer.keys.shape[2] == 33  # the budget plus the newcomer's slot
    pointers = [(lay.keys.data_ptr(), lay.values.data_ptr(), lay.positions.data_ptr()) for lay in cache.layers]
    nbytes = cache.nbytes()
    assert nbytes <= 0.55 * cache.full_nbytes()
    for t in range(2, 10):
        with torch.no_grad():
            logits = model(
                token, **with_cache(model, cache), attention_mask=torch.ones(1, 64 + t, dtype=torch.long)
            ).logits
        token = logits[:, -1:].argmax(-1)
        assert cache.nbytes() == nbytes
        assert [
            (lay.keys.data_ptr(), lay.values.data_ptr(), lay.positions.data_ptr()) for lay in cache.layers
        ] == pointers
        assert all(int((lay.positions >= 0).sum(-1).max()) == 32 for lay in cache.layers)
        assert all(int(lay.positions.max()) == 63 + t for lay in cache.layers)  # newest at its true column
    assert cache.get_seq_length() == 73
    assert cache.stats()[0]["evicted"] == 2 * (64 + 9 - 32)  # 2 KV heads


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"policy": "h2o", "budget": 0.5, "kernel": "cuda"}, "unknown kernel"),
    ],
)
def test_static_bad_input_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        kvkeep.KVKeepCache(tiny_model("llama"), **kwargs)


def test_static_refuses_a_model_whose_every_layer_slides_and_takes_a_hybrid():
    config_cls, kwargs = TINY_CONFIGS["gemma3"]
    sliding = tf.AutoModelForCausalLM.from_config(config_cls(**{**kwargs, "layer_types": ["sliding_attention"] * 4}))
    with pytest.raises(ValueError, match="not a model whose every layer slides .* use static=False"):
        kvkeep.KVKeepCache(sliding, "h2o", budget=0.5, floor=0, static=True)
    kvkeep.KVKeepCache(tiny_model("gemma3"), "h2o", budget=0.5, floor=0, static=True)  # sliding and global


def test_static_full_cache_needs_the_generation_length():
    model = tiny_model("llama")
    cache = kvkeep.KVKeepCache(model, "full", static=True)
    with pytest.raises(ValueError, match="generation length"), torch.no_grad():
        model(random_prompt(10), **with_cache(model, cache))
    cache.reset()
    out = kvkeep.generate(model, random_prompt(10), cache=cache, max_new_tokens=5)
    assert cache.layers[0].keys.shape[2] == 10 + 4  # the prompt plus every token fed back
    with pytest.raises(ValueError, match="is full"), torch.no_grad():
        model(out.tokens[:, -1:], **with_cache(model, cache))


def test_static_takes_one_token_per_step():
    model = tiny_model("llama")
    cache = kvkeep.KVKeepCache(model, "window", budget=0.5, floor=0, static=True)
    with torch.no_grad():
        model(random_prompt(20), **with_cache(model, cache))
        with pytest.raises(ValueError, match="one token per sequence"):
            model(random_prompt(3), **with_cache(model, cache))


def test_cuda_graph_needs_a_static_cache_on_cuda():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cuda_graph=True needs"):
        kvkeep.generate(
            model,
            random_prompt(10),
            cache=kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0),
            max_new_tokens=3,
            cuda_graph=True,
        )


@pytest.mark.parametrize("arch", ["gemma3", "gpt_oss"])
@pytest.mark.parametrize("policy", ["full", *HALF])
def test_static_on_a_hybrid_sliding_model_equals_its_compacting_path(get_model, arch, policy):
    """Gemma 3 or gpt-oss (with learned sinks; sliding layers of a 12-token window beside global ones): each
    sliding layer's slots are a ring of its window, the policy governs the global ones; prompts and the
    generation run past the window."""
    model = get_model(arch)
    ids, mask = _batch()
    params = {} if policy == "full" else HALF[policy]
    runs = []
    for static in (False, True):
        cache = kvkeep.KVKeepCache(model, policy, static=static, kernel="torch", max_new_tokens=24, **params)
        runs.append((kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=24).tokens, cache))
    (dynamic, compacting), (tokens, static) = runs
    assert torch.equal(tokens, dynamic) and static.ready_for_graph()
    window = model.config.sliding_window
    for layer, other in zip(static.layers, compacting.layers, strict=True):
        if layer.sliding_window is not None:  # a ring of the window: window - 1 tokens held between steps
            assert layer.keys.shape[2] == window and int((layer.positions >= 0).sum(-1).amax()) == window - 1
        assert _kept_sets_of(layer) == _kept_sets_of(other)


def _kept_sets_of(layer) -> list:
    return [[set(c for c in head if c >= 0) for head in row] for row in layer.positions.tolist()]
