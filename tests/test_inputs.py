"""Bad and unusual inputs through the Python API: one-line errors naming the fix, no state left behind, numbers
of every kind, per-sequence accounting of padded batches and sliding layers, and reproducible sampling."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import TINY_CONFIGS, greedy, left_pad, random_prompt, tiny_model
from transformers.cache_utils import DynamicCache

import kvkeep
from kvkeep.hf import with_cache
from kvkeep.sampling import Sampling


def one_line(info: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def gemma(layer_types: list[str], window: int = 12) -> torch.nn.Module:
    """A tiny random Gemma 3 with the given layer pattern."""
    config_cls, kwargs = TINY_CONFIGS["gemma3"]
    kwargs = {**kwargs, "num_hidden_layers": len(layer_types), "layer_types": layer_types, "sliding_window": window}
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config_cls(vocab_size=96, initializer_range=0.3, **kwargs)).eval()


def padded_batch(lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([random_prompt(n, seed=n)[0] for n in lengths])


# -- per-sequence accounting ---------------------------------------------------------------------------------
TOKEN_BYTES = 2 * 2 * 16 * 4  # K and V x 2 KV heads x head_dim 16 x float32: one token of one layer
LENGTHS = (6, 20, 9)  # the short ones fit the sliding window of 12, the long one does not


def expected_full(model, real: int) -> int:
    """Bytes full attention holds for a sequence of ``real`` tokens: a sliding layer keeps window - 1 of them."""
    window = model.config.sliding_window
    held = [min(real, window - 1) if kind == "sliding_attention" else real for kind in model.config.layer_types]
    return sum(held) * TOKEN_BYTES


def test_full_policy_keeps_exactly_full_per_sequence_with_padding_and_sliding_layers() -> None:
    model = gemma(["sliding_attention", "full_attention"] * 2)
    ids, mask = padded_batch(LENGTHS)
    cache = kvkeep.KVKeepCache(model, "full")
    seen = []

    def check(index: int, logits, tokens) -> None:
        rows = cache.sequence_bytes()
        assert [kept for kept, _ in rows] == [full for _, full in rows]  # exactly 100%, padding or not
        assert [full for _, full in rows] == [expected_full(model, n + index) for n in LENGTHS]
        seen.append(index)

    kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=6, on_step=check)
    assert seen == list(range(6))  # the prompt, then every decode step (the last token is never fed back)
    # The batch-level count holds the padding columns too: more than the sequences' own tokens.
    assert cache.full_nbytes() > sum(full for _, full in cache.sequence_bytes())


def test_budget_keeps_less_than_full_per_sequence() -> None:
    model = gemma(["sliding_attention", "full_attention"] * 2)
    ids, mask = padded_batch(LENGTHS)
    cache = kvkeep.KVKeepCache(model, "window", budget=0.5, floor=0)
    kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=4)
    for n, (kept, full) in zip(LENGTHS, cache.sequence_bytes(), strict=True):
        real = n + 3
        assert full == expected_full(model, real)
        # Sliding layers keep their window (full policy); global layers keep half the prompt.
        assert kept == (2 * min(real, 11) + 2 * (n // 2)) * TOKEN_BYTES
        assert kept < full


def test_static_full_cache_keeps_exactly_full_per_sequence() -> None:
    model = tiny_model("llama")
    ids, mask = padded_batch(LENGTHS)
    cache = kvkeep.KVKeepCache(model, "full", static=True)
    kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=5)
    assert cache.ready_for_graph()  # every layer on slot buffers
    rows = cache.sequence_bytes()
    assert [kept for kept, _ in rows] == [full for _, full in rows] == [2 * (n + 4) * TOKEN_BYTES for n in LENGTHS]


# -- the one line about mostly-sliding models -------------------------------------------------------------
def hybrid_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvkeep" and r.levelno == logging.WARNING]


def test_mostly_sliding_model_says_once_per_cache_what_the_budget_governs(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvkeep")
    model = gemma(["sliding_attention"] * 5 + ["full_attention"])  # Gemma 3's 5 : 1
    prompt = random_prompt(40, seed=1)
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    kvkeep.generate(model, prompt, cache=cache, max_new_tokens=1)
    # 1 global layer x 40 tokens, 5 sliding layers x 11: the budget governs 40 / 95 = 42%; it keeps
    # (20 + 55) / 95 = 79% of them, which is what the cache holds after the prompt.
    [line] = hybrid_lines(caplog)
    assert "\n" not in line
    assert "5 of 6 layers" in line and "12-token window" in line and "other 1 layers" in line
    assert "42% of the KV bytes of a 40-token prompt" in line and "budget 0.5 keeps about 79%" in line
    assert cache.nbytes() / cache.full_nbytes() == pytest.approx(75 / 95)

    cache.reset()
    kvkeep.generate(model, prompt, cache=cache, max_new_tokens=5)
    assert len(hybrid_lines(caplog)) == 1  # once per cache, however many generations and steps
    kvkeep.generate(model, prompt, cache=kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0), max_new_tokens=3)
    assert len(hybrid_lines(caplog)) == 2  # and once for the next cache


def test_no_line_for_full_policy_or_a_model_not_mostly_sliding(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="kvkeep")
    mostly = gemma(["sliding_attention"] * 5 + ["full_attention"])
    half = gemma(["sliding_attention", "full_attention"] * 2)
    prompt = random_prompt(40, seed=1)
    kvkeep.generate(mostly, prompt, cache=kvkeep.KVKeepCache(mostly, "full"), max_new_tokens=2)
    kvkeep.generate(half, prompt, cache=kvkeep.KVKeepCache(half, "h2o", budget=0.5, floor=0), max_new_tokens=2)
    assert hybrid_lines(caplog) == []


# -- numbers of every kind ---------------------------------------------------------------------------------
MODEL = tiny_model("llama")
PROMPT = random_prompt(30, seed=2)
POLICIES = [("window", {}), ("streaming", {}), ("h2o", {}), ("keyformer", {}), ("co2", {"N": 0})]


@pytest.fixture(scope="module")
def full_tokens() -> torch.Tensor:
    return kvkeep.generate(MODEL, PROMPT, cache=kvkeep.KVKeepCache(MODEL), max_new_tokens=6).tokens


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("policy, params", POLICIES)
def test_huge_int_budget_keeps_everything(full_tokens, policy, params, static) -> None:
    cache = kvkeep.KVKeepCache(MODEL, policy, budget=10**30, static=static, **params)
    run = kvkeep.generate(MODEL, PROMPT, cache=cache, max_new_tokens=6)
    assert torch.equal(run.tokens, full_tokens)
    assert cache.sequence_bytes() == [(cache.full_nbytes(), cache.full_nbytes())]
    assert cache.nbytes() <= cache.full_nbytes() + 2 * TOKEN_BYTES  # static: one spare slot per layer at most
    assert all(s["evicted"] == 0 for s in cache.stats())


def test_huge_budget_in_a_static_cache_without_the_generation_length_is_one_line() -> None:
    cache = kvkeep.KVKeepCache(MODEL, "h2o", budget=10**30, static=True)
    with torch.no_grad():
        token = MODEL(PROMPT, **with_cache(MODEL, cache)).logits[:, -1:].argmax(-1)
        with pytest.raises(ValueError) as info:
            MODEL(token, **with_cache(MODEL, cache), attention_mask=torch.ones(1, 31, dtype=torch.long))
    one_line(info, "never evicts", "max_new_tokens=N")


@pytest.mark.parametrize(
    "budget, same_as",
    [(np.float32(0.5), 0.5), (np.float64(0.5), 0.5), (np.int64(12), 12), (np.int32(12), 12), (np.array(0.5), 0.5)],
)
def test_numpy_budgets_are_plain_numbers(budget, same_as) -> None:
    cache = kvkeep.KVKeepCache(MODEL, "h2o", budget=budget)
    assert cache.policy.budget == same_as and type(cache.policy.budget) is type(same_as)
    reference = kvkeep.KVKeepCache(MODEL, "h2o", budget=same_as)
    tokens = kvkeep.generate(MODEL, PROMPT, cache=cache, max_new_tokens=4).tokens
    assert torch.equal(tokens, kvkeep.generate(MODEL, PROMPT, cache=reference, max_new_tokens=4).tokens)
    assert cache.sequence_bytes() == reference.sequence_bytes()


def test_numpy_policy_parameters_are_plain_numbers() -> None:
    cache = kvkeep.KVKeepCache(
        MODEL, "keyformer", budget=np.float32(0.5), sinks=np.int64(2), recent_ratio=np.float32(0.25),
        tau_end=np.float64(3.0), seed=np.uint32(5), noise=np.bool_(True),
    )  # fmt: skip
    params = cache.policy.params()
    assert json.loads(json.dumps(params)) == params  # plain Python numbers
    assert params["sinks"] == 2 and params["recent_ratio"] == 0.25 and params["seed"] == 5 and params["noise"] is True
    kvkeep.generate(MODEL, PROMPT, cache=cache, max_new_tokens=3)
    co2 = kvkeep.KVKeepCache(MODEL, "co2", budget=0.5, floor=0, N=np.int32(0), alpha=np.float16(0.5))
    assert co2.policy.N == 0 and type(co2.policy.N) is int


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(policy="h2o", budget=float("nan")), "budget must be a float ratio in (0, 1]"),
        (dict(policy="keyformer", budget=0.5, tau_init=float("nan")), "tau_init"),
        (dict(policy="co2", budget=0.5, alpha=float("nan")), "alpha"),
        (dict(policy="keyformer", budget=0.5, seed="abc"), "seed must be an integer"),
        (dict(policy="keyformer", budget=0.5, seed=1.5), "seed must be an integer"),
        (dict(policy="keyformer", budget=0.5, noise="yes"), "noise must be true or false"),
        (dict(policy="h2o", budget=np.bool_(True)), "budget must be"),
    ],
)
def test_bad_policy_values_are_one_line(kwargs, fragment) -> None:
    with pytest.raises(ValueError) as info:
        kvkeep.KVKeepCache(MODEL, **kwargs)
    one_line(info, fragment)


# -- prompts: empty, beyond the context ------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, mask, fragment",
    [
        (torch.zeros(1, 0, dtype=torch.long), None, "the prompt is empty"),
        (torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), "the prompt is empty"),
        (torch.tensor([[5, 6, 7], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]]), "attention mask is all zeros"),
        (torch.tensor([5, 6, 7]), None, "add a batch dimension"),
        (torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1]]), "does not match"),
    ],
)
def test_empty_or_malformed_prompt_is_one_line(ids, mask, fragment) -> None:
    cache = kvkeep.KVKeepCache(MODEL, "h2o", budget=0.5, floor=0)
    with pytest.raises(ValueError) as info:
        kvkeep.generate(MODEL, ids, mask, cache=cache, max_new_tokens=3)
    one_line(info, fragment)
    assert cache.get_seq_length() == 0  # refused before any forward: the cache is still usable
    kvkeep.generate(MODEL, PROMPT, cache=cache, max_new_tokens=2)


def test_a_tokenizer_or_anything_but_a_model_as_the_first_argument_is_one_line() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    for thing in (tokenizer, "smollm2", None):
        with pytest.raises(ValueError) as info:
            kvkeep.KVKeepCache(thing, "h2o", 0.5)
        one_line(info, "first argument must be the model", type(thing).__name__)


def test_an_empty_row_in_model_generate_is_one_line() -> None:
    """An all-zero attention-mask row reaches the cache, which refuses it (a budget of a 0-token prompt).

    An input of shape [1, 0] fails inside transformers before any cache sees it, as it does without kvkeep.
    """
    ids, mask = torch.tensor([[0, 0, 0], [5, 6, 7]]), torch.tensor([[0, 0, 0], [1, 1, 1]])
    cache = kvkeep.KVKeepCache(MODEL, "h2o", budget=0.5, floor=0)
    with pytest.raises(ValueError) as info:
        greedy(MODEL, ids, cache, 3, attention_mask=mask)
    one_line(info, "a prompt of the batch is empty")


def short_context_model() -> torch.nn.Module:
    config_cls, kwargs = TINY_CONFIGS["llama"]
    torch.manual_seed(0)
    config = config_cls(vocab_size=96, initializer_range=0.3, max_position_embeddings=32, **kwargs)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_generate_refuses_to_run_past_the_context_unless_asked() -> None:
    model = short_context_model()
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    kvkeep.generate(model, random_prompt(28), cache=cache, max_new_tokens=4)  # 32: exactly the context
    cache.reset()
    with pytest.raises(ValueError) as info:
        kvkeep.generate(model, random_prompt(30), cache=cache, max_new_tokens=4)
    one_line(info, "30 tokens", "4 more", "32-token context", "beyond_context=True")
    assert cache.get_seq_length() == 0
    ids, mask = left_pad([random_prompt(30)[0], random_prompt(5)[0]])  # the longest real prompt counts
    with pytest.raises(ValueError, match="30 tokens"):
        kvkeep.generate(model, ids, mask, max_new_tokens=4)
    run = kvkeep.generate(model, random_prompt(30), cache=cache, max_new_tokens=4, beyond_context=True)
    assert run.tokens.shape == (1, 4)


@pytest.mark.parametrize("max_new_tokens", [0, -1, 2.5, "3", True])
def test_bad_max_new_tokens_is_one_line(max_new_tokens) -> None:
    with pytest.raises(ValueError) as info:
        kvkeep.generate(MODEL, PROMPT, max_new_tokens=max_new_tokens)
    one_line(info, "max_new_tokens must be an int >= 1")


def test_numpy_max_new_tokens_is_accepted() -> None:
    assert kvkeep.generate(MODEL, PROMPT, max_new_tokens=np.int64(3)).tokens.shape == (1, 3)


# -- devices and kernels ------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_line_before_loading(monkeypatch, tmp_path) -> None:
    from kvkeep import models

    def loaded(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", loaded)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError) as info:
            kvkeep.load_model("smollm2", device=device)
        one_line(info, "no CUDA GPU", "use cpu")
    with pytest.raises(ValueError) as info:
        kvkeep.load_model("smollm2", device="tpu")
    one_line(info, "unknown device 'tpu'")


def test_triton_kernel_on_a_cpu_is_one_line_and_leaves_the_model_as_it_was(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with pytest.raises(ValueError) as info:
        kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0, static=True, kernel="triton")
    one_line(info, "kernel='triton' needs a CUDA device", "kernel='auto' or 'torch'")
    assert model.config._attn_implementation == before  # not switched to kvkeep's attention


# -- no state left behind by an error ----------------------------------------------------------------------
def test_a_cache_used_with_another_model_raises_and_leaves_both_models_working() -> None:
    model_a = tiny_model("llama")  # 2 KV heads
    model_b = tiny_model("mistral")  # 1 KV head
    twin = tiny_model("llama", seed=1)  # the same shapes as A, never switched to kvkeep
    prompt = random_prompt(24, seed=3)
    ids = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        b_logits = model_b(**ids, **with_cache(model_b, DynamicCache(config=model_b.config))).logits
    b_tokens, twin_tokens = greedy(model_b, prompt), greedy(twin, prompt)
    a_tokens = kvkeep.generate(
        model_a, prompt, cache=kvkeep.KVKeepCache(model_a, "h2o", budget=0.5, floor=0), max_new_tokens=8
    )

    kvkeep.KVKeepCache(model_b, "h2o", budget=0.5, floor=0)  # B on kvkeep's attention too: only its shape tells
    for model, fragment in ((model_b, "1 of dimension 16"), (twin, "did not run through kvkeep")):
        cache = kvkeep.KVKeepCache(model_a, "h2o", budget=0.5, floor=0)
        with pytest.raises(ValueError) as info:
            kvkeep.generate(model, prompt, cache=cache, max_new_tokens=4)
        one_line(info, fragment, "KVKeepCache(model, ...) for the model that uses it")
    with pytest.raises(ValueError, match="built for"):
        greedy(model_b, prompt, kvkeep.KVKeepCache(model_a, "h2o", budget=0.5, floor=0, max_new_tokens=4), 4)

    with torch.no_grad():
        again = model_b(**ids, **with_cache(model_b, DynamicCache(config=model_b.config))).logits
    torch.testing.assert_close(again, b_logits, rtol=0, atol=1e-5)
    assert torch.equal(greedy(model_b, prompt), b_tokens)
    assert torch.equal(greedy(twin, prompt), twin_tokens)
    a_again = kvkeep.generate(
        model_a, prompt, cache=kvkeep.KVKeepCache(model_a, "h2o", budget=0.5, floor=0), max_new_tokens=8
    )
    assert torch.equal(a_again.tokens, a_tokens.tokens)


def test_an_error_inside_a_forward_leaves_the_model_usable() -> None:
    model = tiny_model("llama")
    prompt = random_prompt(30, seed=4)
    plain = greedy(model, prompt)
    h2o = kvkeep.generate(model, prompt, cache=kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0), max_new_tokens=6)
    cache = kvkeep.KVKeepCache(model, "streaming", budget=0.1, floor=0)  # 3 tokens: fewer than its 4 sinks
    with pytest.raises(ValueError) as info:
        kvkeep.generate(model, prompt, cache=cache, max_new_tokens=6)  # raised by layer 0's attention
    one_line(info, "smaller than sinks")
    assert torch.equal(greedy(model, prompt), plain)
    again = kvkeep.generate(
        model, prompt, cache=kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0), max_new_tokens=6
    )
    assert torch.equal(again.tokens, h2o.tokens)


# -- warnings ---------------------------------------------------------------------------------------------
def test_no_future_warning_from_kvkeep_runs() -> None:
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cache = kvkeep.KVKeepCache(model, "keyformer", budget=0.5, floor=0, max_new_tokens=4)
        greedy(model, PROMPT, cache, 4)
        for static in (False, True):
            cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0, static=static)
            kvkeep.generate(model, PROMPT, cache=cache, max_new_tokens=4)


# -- sampling ---------------------------------------------------------------------------------------------
def sampled(model, ids, mask=None, cache=None, sampling=None) -> torch.Tensor:
    return kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=8, sampling=sampling).tokens


@pytest.mark.parametrize("policy", [None, "h2o"])
def test_sampling_is_seeded_and_a_request_samples_the_same_alone_or_batched(policy) -> None:
    def cache():
        return None if policy is None else kvkeep.KVKeepCache(MODEL, policy, budget=0.5, floor=0)

    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
    short, long = random_prompt(12, seed=5), random_prompt(30, seed=6)
    alone = sampled(MODEL, long, cache=cache(), sampling=hot)
    assert torch.equal(sampled(MODEL, long, cache=cache(), sampling=hot), alone)  # run to run
    other = sampled(MODEL, long, cache=cache(), sampling=Sampling(temperature=1.5, top_p=0.95, seed=8))
    assert not torch.equal(other, alone)  # the seed matters
    assert not torch.equal(alone, sampled(MODEL, long, cache=cache()))  # and it is not greedy decoding

    ids, mask = left_pad([short[0], long[0]])
    rows = [Sampling(temperature=0.8, seed=3), hot]
    batch = sampled(MODEL, ids, mask, cache=cache(), sampling=rows)
    assert torch.equal(batch[1:], alone)  # the long request, batched with another, samples the same tokens
    assert torch.equal(batch[:1], sampled(MODEL, short, cache=cache(), sampling=rows[0]))
    mixed = sampled(MODEL, ids, mask, cache=cache(), sampling=[Sampling(), hot])  # a greedy row beside it
    assert torch.equal(mixed[1:], alone)
    assert torch.equal(mixed[:1], sampled(MODEL, short, cache=cache()))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(temperature=-1), "temperature must be a number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a number >= 0"),
        (dict(top_p=2), "top_p must be in (0, 1]"),
        (dict(top_p=0), "top_p must be in (0, 1]"),
        (dict(seed=2**63), "seed must be an integer that fits in 64 bits"),
        (dict(seed=-(2**63) - 1), "seed must be an integer that fits in 64 bits"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed="7"), "seed must be an integer"),
    ],
)
def test_bad_sampling_is_one_line(kwargs, fragment) -> None:
    with pytest.raises(ValueError) as info:
        Sampling(**kwargs)
    one_line(info, fragment)


def test_sampling_seeds_are_their_low_32_bits() -> None:
    """Seeds equal modulo 2**32 sample alike (the noise hashes 32 bits, as Keyformer's does); numpy seeds work."""
    hot = dict(temperature=1.5, top_p=0.95)
    tokens = sampled(MODEL, PROMPT, sampling=Sampling(**hot, seed=7))
    for seed in (7 + 2**32, np.int64(7), 2**63 - 2**64 + 7):
        assert torch.equal(sampled(MODEL, PROMPT, sampling=Sampling(**hot, seed=seed)), tokens)


def test_sampling_rows_must_match_the_batch() -> None:
    with pytest.raises(ValueError) as info:
        kvkeep.generate(MODEL, PROMPT, max_new_tokens=2, sampling=[Sampling(), Sampling()])
    one_line(info, "2 settings for a batch of 1")
