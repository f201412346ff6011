"""Question-aware prompt scoring: the observation window, pooling, the floor for short prompts, and peak bytes.

References are computed by hand from eager attention probabilities of the same tiny model.
"""

import pytest
import torch
from conftest import eager_attention, greedy, left_pad, random_prompt, require_triton, tiny_model

import kvkeep
from kvkeep.hf import with_cache
from kvkeep.policies import make_policy

N_PROMPT, STEPS, WINDOW = 20, 3, 6
SCORING = ("h2o", "keyformer", "co2")
#: The scoring rule as H2O, Keyformer and CO2 were published: every prompt query scores, no pooling, no floor.
PAPER = dict(observe=0, pool=1, floor=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")  # 4 query heads sharing 2 KV heads


@pytest.fixture(scope="module")
def eager_probs(model):
    """Eager attention probabilities over the prompt, per layer: ``[Hq, n, n]`` float64."""
    prompt = random_prompt(N_PROMPT, seed=5)
    return prompt, eager_attention(prompt)


def _group_mean(per_query_head: torch.Tensor) -> torch.Tensor:
    return per_query_head.view(2, -1, *per_query_head.shape[1:]).mean(1)  # [Hkv, ...]


def _prompt_only(model, prompt, policy, **params) -> kvkeep.KVKeepCache:
    """The cache after the prompt alone (one generated token: no decode step is scored)."""
    cache = kvkeep.KVKeepCache(model, policy, **params)
    greedy(model, prompt, cache, new_tokens=1)
    return cache


@pytest.mark.parametrize("policy", SCORING)
def test_a_window_as_long_as_the_prompt_equals_every_query(model, policy):
    """The window alone, as long as the prompt and unpooled, is the published rule (tokens, kept set, scores)."""
    prompts = [random_prompt(40, seed=3)[0], random_prompt(31, seed=4)[0]]
    ids, mask = left_pad(prompts)
    paper = kvkeep.KVKeepCache(model, policy, budget=0.5, **PAPER)
    expected = greedy(model, ids, paper, 12, attention_mask=mask)
    for observe in (40, 1000):
        cache = kvkeep.KVKeepCache(model, policy, budget=0.5, observe=observe, pool=1, floor=0, every_query=False)
        assert torch.equal(greedy(model, ids, cache, 12, attention_mask=mask), expected)
        for a, b in zip(paper.layers, cache.layers, strict=True):
            assert torch.equal(a.positions, b.positions)
            assert torch.equal(a.scores, b.scores)


def test_h2o_prompt_score_is_the_last_w_queries_attention(model, eager_probs):
    prompt, probs = eager_probs
    cache = _prompt_only(model, prompt, "h2o", budget=1000, observe=WINDOW, pool=1, floor=0, every_query=False)
    for layer, p in zip(cache.layers, probs, strict=True):
        reference = _group_mean(p[:, N_PROMPT - WINDOW :].sum(1))  # [Hkv, n]: column sums of the window's rows
        assert reference[:, : N_PROMPT - WINDOW].abs().sum() > 0  # the window does attend to earlier tokens
        torch.testing.assert_close(layer.scores[0].double(), reference, rtol=1e-5, atol=1e-6)


def test_co2_prompt_score_is_its_decay_of_the_window(model, eager_probs):
    prompt, probs = eager_probs
    params = dict(budget=1000, observe=WINDOW, pool=1, floor=0, every_query=False, alpha=0.3, N=0)
    cache = _prompt_only(model, prompt, "co2", **params)
    for layer, p in zip(cache.layers, probs, strict=True):
        reference = 0.3 * _group_mean(p[:, N_PROMPT - WINDOW :].sum(1))
        torch.testing.assert_close(layer.scores[0].double(), reference, rtol=1e-5, atol=1e-6)


def test_pooled_score_is_the_mean_over_neighbours(model, eager_probs):
    prompt, probs = eager_probs
    cache = _prompt_only(model, prompt, "h2o", budget=1000, observe=WINDOW, pool=5, floor=0, every_query=False)
    for layer, p in zip(cache.layers, probs, strict=True):
        window = _group_mean(p[:, N_PROMPT - WINDOW :].sum(1))
        reference = torch.stack([window[:, max(0, j - 2) : j + 3].mean(-1) for j in range(N_PROMPT)], dim=-1)
        torch.testing.assert_close(layer.scores[0].double(), reference, rtol=1e-5, atol=1e-6)


def test_the_default_blend_adds_the_pooled_window_to_every_query_at_equal_weight(model, eager_probs):
    """``every + (n / W) * pool(window)``: both parts carry the same attention mass."""
    prompt, probs = eager_probs
    cache = _prompt_only(model, prompt, "h2o", budget=1000, observe=WINDOW, pool=3, floor=0)
    for layer, p in zip(cache.layers, probs, strict=True):
        every = _group_mean(p.sum(1))
        window = _group_mean(p[:, N_PROMPT - WINDOW :].sum(1))
        pooled = torch.stack([window[:, max(0, j - 1) : j + 2].mean(-1) for j in range(N_PROMPT)], dim=-1)
        reference = every + (N_PROMPT / WINDOW) * pooled
        torch.testing.assert_close(layer.scores[0].double(), reference, rtol=1e-5, atol=1e-6)


def test_kept_set_is_chosen_by_the_window_scores(model, eager_probs):
    """Budget 10 with 5 recent: the 5 newest plus, per KV head, the 5 best by the window's attention."""
    prompt, probs = eager_probs
    cache = _prompt_only(model, prompt, "h2o", budget=10, observe=WINDOW, pool=1, floor=0, every_query=False)
    for layer, p in zip(cache.layers, probs, strict=True):
        window = _group_mean(p[:, N_PROMPT - WINDOW :].sum(1))  # [Hkv, n]
        recent = set(range(N_PROMPT - 5, N_PROMPT))
        for head in range(2):
            best = window[head, : N_PROMPT - 5].topk(5).indices.tolist()
            kept = set(layer.positions[0, head].tolist()) - {-1}
            assert kept == recent | set(best)


def test_the_window_changes_what_is_kept(model):
    """On a prompt longer than the window the kept set differs from the published rule's (it is not a no-op)."""
    prompt = random_prompt(60, seed=11)
    paper = _prompt_only(model, prompt, "h2o", budget=0.3, **PAPER)
    window = _prompt_only(model, prompt, "h2o", budget=0.3, observe=8, pool=1, floor=0, every_query=False)
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(paper.layers, window.layers, strict=True))


#: (arch, policy, every_query): gpt-oss (learned sinks) with the window added to every row's score.
FUSED_CASES = [("llama", p, e) for p in SCORING for e in (True, False)] + [("gpt_oss", p, True) for p in SCORING]


@pytest.mark.parametrize(("arch", "policy", "every_query"), FUSED_CASES)
def test_triton_prefill_with_window_and_pool_equals_torch(arch, policy, every_query):
    """The fused prefill (on a GPU, or Triton's interpreter on a CPU) keeps what the torch path keeps; gpt-oss:
    SDPA's output rescaled for the learned sinks, and the sinks in the scores' denominators."""
    require_triton()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(arch).to(device)
    ids, mask = (t.to(device) for t in left_pad([random_prompt(45, seed=12)[0], random_prompt(38, seed=13)[0]]))
    options = dict(budget=0.4, observe=9, pool=5, floor=0, every_query=every_query)
    outs, caches, logits = [], [], []
    for kernel in ("torch", "triton"):
        cache = kvkeep.KVKeepCache(model, policy, kernel=kernel, **options)
        with torch.no_grad():  # the prompt's own logits: the fused path takes its attention output from SDPA
            prompt = kvkeep.KVKeepCache(model, policy, kernel=kernel, **options)
            logits.append(model(input_ids=ids, attention_mask=mask, **with_cache(model, prompt)).logits[mask.bool()])
        outs.append(greedy(model, ids, cache, 6, attention_mask=mask))
        caches.append(cache)
    assert torch.equal(*outs)
    torch.testing.assert_close(*logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(*(c.layers for c in caches), strict=True):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-6)


# -- the floor ----------------------------------------------------------------------------------------------
def test_floor_raises_a_ratio_budget_but_never_a_token_count():
    policy = make_policy("h2o", 0.5, floor=64)
    assert policy.budget_tokens(30) == 64 and policy.floored(30)
    assert policy.budget_tokens(1000) == 500 and not policy.floored(1000)
    assert make_policy("h2o", 10, floor=64).budget_tokens(30) == 10  # an explicit count stays exact
    assert not make_policy("h2o", 10, floor=64).floored(30)
    with pytest.raises(ValueError, match="floor must be an int >= 0"):
        make_policy("window", 0.5, floor=-1)


@pytest.mark.parametrize("policy", ["window", "streaming", *SCORING])
def test_a_prompt_under_the_floor_is_not_compressed(model, policy):
    """A short prompt plus its answer under the floor: the same tokens as full, nothing evicted, reported."""
    prompt = random_prompt(24, seed=14)
    full = greedy(model, prompt, kvkeep.KVKeepCache(model, "full"), 10)
    cache = kvkeep.KVKeepCache(model, policy, budget=0.5, floor=64)
    assert torch.equal(greedy(model, prompt, cache, 10), full)
    assert sum(layer["evicted"] for layer in cache.stats()) == 0
    assert cache.floored() == [True]
    measure = {"N": 0} if policy == "co2" else {}  # CO2 evicts nothing in its first N steps anyway
    unfloored = kvkeep.KVKeepCache(model, policy, budget=0.5, floor=0, **measure)
    greedy(model, prompt, unfloored, 10)
    assert unfloored.floored() == [False]
    assert sum(layer["evicted"] for layer in unfloored.stats()) > 0


def test_floor_holds_in_the_static_cache(model):
    prompt = random_prompt(24, seed=15)
    full = greedy(model, prompt, kvkeep.KVKeepCache(model, "full"), 10)
    cache = kvkeep.KVKeepCache(model, "keyformer", budget=0.5, floor=40, static=True)
    assert torch.equal(greedy(model, prompt, cache, 10), full)
    assert cache.floored() == [True]
    assert max(max(layer["kept"]) for layer in cache.stats()) <= 40


# -- peak bytes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_co2_peak_is_full_while_it_measures(model, static):
    """An answer shorter than N never sees the cut: it held full attention's bytes, however little it keeps later."""
    prompt = random_prompt(40, seed=16)
    measuring = kvkeep.KVKeepCache(model, "co2", budget=0.25, N=20, static=static, floor=0)
    greedy(model, prompt, measuring, 8)
    full = kvkeep.KVKeepCache(model, "full")
    greedy(model, prompt, full, 8)
    assert measuring.peak_sequence_bytes() == [full.sequence_bytes()[0][1]]
    cut = kvkeep.KVKeepCache(model, "co2", budget=0.25, N=4, static=static, floor=0)
    greedy(model, prompt, cut, 12)
    kept, whole = cut.sequence_bytes()[0]
    (peak,) = cut.peak_sequence_bytes()
    assert kept < peak <= whole  # it held prompt + N - 1 tokens before the cut, far more than it keeps


@pytest.mark.parametrize("policy", ["window", "h2o", "keyformer"])
def test_peak_of_a_policy_that_never_measures_is_what_it_keeps(model, policy):
    ids, mask = left_pad([random_prompt(40, seed=17)[0], random_prompt(30, seed=18)[0]])
    cache = kvkeep.KVKeepCache(model, policy, budget=0.5, floor=0)
    greedy(model, ids, cache, 8, attention_mask=mask)
    assert cache.peak_sequence_bytes() == [kept for kept, _ in cache.sequence_bytes()]


def test_pooling_is_the_same_alone_and_in_a_padded_batch(model):
    """Padding slots count in neither the sum nor the divisor: a left-padded sequence pools as it does alone."""
    short, long = random_prompt(30, seed=19)[0], random_prompt(50, seed=20)[0]
    ids, mask = left_pad([long, short])
    options = dict(budget=0.4, observe=8, pool=9, floor=0)
    batched = kvkeep.KVKeepCache(model, "h2o", **options)
    together = greedy(model, ids, batched, 6, attention_mask=mask)
    alone = kvkeep.KVKeepCache(model, "h2o", **options)
    assert torch.equal(greedy(model, short[None], alone, 6), together[1:])
    for a, b in zip(alone.layers, batched.layers, strict=True):
        kept = b.positions[1][b.positions[1] >= 0].view(2, -1)
        assert torch.equal(a.positions[0], kept)
