"""The GPU decode path end to end: static cache + fused Triton kernel + CUDA graph.

On a machine without CUDA these tests run the same Triton kernel through Triton's interpreter on the
CPU (slow, so on a tiny model), and the CUDA-graph tests are skipped.
"""

import pytest
import torch
from conftest import COVERING, HALF, left_pad, random_prompt, weigh_sinks

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()  # without it, conftest runs Triton in its interpreter

import transformers as tf  # noqa: E402

import kvkeep  # noqa: E402

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _model(device: str, dtype=torch.float32, layers: int = 2, hidden: int = 64):
    """A random Llama (GQA 4/2 heads) with peaked logits, so greedy tokens are not near-ties."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, initializer_range=0.3, max_position_embeddings=4096,
    )  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype).eval()


def _batch(device: str, lengths=(40, 27, 33)):
    ids, mask = left_pad([random_prompt(n, seed=i, vocab=256)[0] for i, n in enumerate(lengths)])
    return ids.to(device), mask.to(device)


DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("policy", list(HALF))
def test_triton_slot_path_matches_torch_slot_path(policy):
    model = _model(DEVICE)
    ids, mask = _batch(DEVICE)
    runs = {}
    for kernel in ("torch", "triton"):
        cache = kvkeep.KVKeepCache(model, policy, static=True, kernel=kernel, **HALF[policy])
        runs[kernel] = (kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=8, cuda_graph=False), cache)
    assert torch.equal(runs["torch"][0].tokens, runs["triton"][0].tokens)
    for a, b in zip(runs["torch"][1].layers, runs["triton"][1].layers, strict=True):
        assert torch.equal(a.positions.sort(-1).values, b.positions.sort(-1).values)  # the same kept sets
        if a.scores is not None:
            order_a, order_b = a.positions.argsort(-1), b.positions.argsort(-1)
            torch.testing.assert_close(a.scores.gather(-1, order_a), b.scores.gather(-1, order_b), rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("policy", list(COVERING))
def test_gpu_tokens_identical_to_torch_path_at_covering_budget(policy):
    model = _model("cuda", layers=4, hidden=256)
    ids, mask = _batch("cuda", lengths=(300, 217, 256))
    reference = kvkeep.generate(
        model, ids, mask, cache=kvkeep.KVKeepCache(model, policy, **COVERING[policy]), max_new_tokens=48
    )
    fast = kvkeep.KVKeepCache(model, policy, static=True, **COVERING[policy])
    run = kvkeep.generate(model, ids, mask, cache=fast, max_new_tokens=48)
    assert run.graph_steps > 40
    assert torch.equal(run.tokens, reference.tokens)


@needs_cuda
@pytest.mark.parametrize("policy", list(HALF))
def test_cuda_graph_replay_equals_eager_slot_steps(policy):
    model = _model("cuda", dtype=torch.bfloat16, layers=4, hidden=256)
    ids, mask = _batch("cuda", lengths=(300, 217, 256))
    runs = []
    for graph in (False, True):
        cache = kvkeep.KVKeepCache(model, policy, static=True, **HALF[policy])
        runs.append((kvkeep.generate(model, ids, mask, cache=cache, max_new_tokens=40, cuda_graph=graph), cache))
    assert runs[1][0].graph_steps > 30
    assert torch.equal(runs[0][0].tokens, runs[1][0].tokens)
    for a, b in zip(runs[0][1].layers, runs[1][1].layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert a.get_seq_length() == b.get_seq_length() == 300 + 39
    assert runs[1][1].stats()[0]["evicted"] == runs[0][1].stats()[0]["evicted"]


@needs_cuda
@pytest.mark.parametrize("policy", list(HALF))
def test_engine_on_cuda_batching_changes_no_token_and_covering_budget_is_full_attention(policy):
    from kvkeep.engine import Request, build
    from kvkeep.policies import make_policy

    class NoText:
        def decode(self, ids, skip_special_tokens=True):
            return ""

    model = _model("cuda", layers=4, hidden=256)
    prompts = [random_prompt(n, seed=n, vocab=256)[0].tolist() for n in (300, 217, 256, 120, 333, 190)]

    def serve(requests, **params):
        policy_ = make_policy(policy, **{**HALF[policy], **params})
        engine = build(model, NoText(), policy_, max_prompt=400, max_tokens=40, rows=4)
        assert all(step.graph is not None for step in engine.runner.steps.values())  # replayed as CUDA graphs
        return engine.run(requests)

    batched = serve([Request(p, 40) for p in prompts])
    for request, prompt in zip(batched, prompts, strict=True):
        assert serve([Request(prompt, 40)])[0].output_ids == request.output_ids
    if policy != "full":
        covering = {k: v for k, v in COVERING[policy].items() if k != "budget"}
        served = serve([Request(p, 40) for p in prompts[:4]], budget=1000, **covering)
        for request, prompt in zip(served, prompts, strict=False):
            cache = kvkeep.KVKeepCache(model, "full")
            reference = kvkeep.generate(model, torch.tensor([prompt], device="cuda"), cache=cache, max_new_tokens=40)
            assert request.output_ids == reference.row(0)


@needs_cuda
@pytest.mark.parametrize("policy", ["h2o", "co2"])
def test_engine_iterations_without_a_prefill_wait_for_nothing_but_the_step_they_hand_out(policy, monkeypatch):
    """Asynchronous scheduling on the GPU: once the requests are admitted, an iteration (launch, hand out the
    step before, finish requests, free rows, a CO2 request's move aside) never waits for the device except for
    the outputs it reads; any other wait (a ``.tolist()`` of a device tensor, a blocking copy) raises here."""
    from kvkeep.engine import Request, build
    from kvkeep.engine.handoff import Handoff
    from kvkeep.policies import make_policy

    class NoText:
        def decode(self, ids, skip_special_tokens=True):
            return ""

    model = _model("cuda", layers=4, hidden=256)
    engine = build(model, NoText(), make_policy(policy, **HALF[policy]), max_prompt=400, max_tokens=40, rows=4)
    prompts = [random_prompt(n, seed=n, vocab=256)[0].tolist() for n in (300, 217, 256, 120)]
    lengths = (40, 9, 23, 2)  # requests end on different iterations
    requests = [engine.submit(Request(p, n, stop_ids={999})) for p, n in zip(prompts, lengths, strict=True)]
    engine.step()  # admits every request (a prefill waits for the device: outside the check)
    assert not engine.waiting

    def unchecked(call):  # what may wait: reading a handoff, and a CO2 cut (it reads its row's counters)
        def run(*args):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return call(*args)
            finally:
                torch.cuda.set_sync_debug_mode("error")

        return run

    monkeypatch.setattr(Handoff, "get", unchecked(Handoff.get))
    monkeypatch.setattr(engine.runner, "move", unchecked(engine.runner.move))
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.busy:
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [len(r.output_ids) for r in requests] == list(lengths) and engine.stats()["step_ms_mean"] > 0


def _hybrid(arch: str, device: str):
    """A random Gemma 3 text model (three of four layers slide over a 16-token window, Gemma 3's layout),
    Gemma 2 (sliding and global layers alternate; logits soft-capped at 5) or gpt-oss (they alternate; learned
    sinks; four experts)."""
    torch.manual_seed(0)
    sizes = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, initializer_range=0.3, sliding_window=16,
    )  # fmt: skip
    if arch == "gemma2":
        config = tf.Gemma2Config(**sizes, attn_logit_softcapping=5.0)
    elif arch == "gpt_oss":
        config = tf.GptOssConfig(**sizes, num_local_experts=4, num_experts_per_tok=2)
    else:
        config = tf.Gemma3TextConfig(**sizes, layer_types=["sliding_attention"] * 3 + ["full_attention"])
    return weigh_sinks(tf.AutoModelForCausalLM.from_config(config)).to(device).eval()


HYBRID_CASES = (
    [(arch, policy) for arch in ("gemma3", "gemma2", "gpt_oss") for policy in ("full", *HALF)]
    if CUDA
    else [("gemma3", "h2o"), ("gemma3", "keyformer"), ("gemma2", "keyformer"), ("gpt_oss", "h2o")]  # slow interpreter
)


@pytest.mark.parametrize("arch, policy", HYBRID_CASES)
def test_hybrid_sliding_model_on_triton_slots_and_engine_equals_the_compacting_torch_path(arch, policy):
    """Sliding layers as rings of their window through the Triton kernels (Gemma 2's soft-capping and gpt-oss's
    learned sinks in them too), and on CUDA the CUDA graph and the engine, give the compacting torch path's tokens."""
    model = _hybrid(arch, DEVICE)
    ids, mask = _batch(DEVICE)
    params = {} if policy == "full" else HALF[policy]
    reference = kvkeep.KVKeepCache(model, policy, kernel="torch", max_new_tokens=24, **params)
    expected = kvkeep.generate(model, ids, mask, cache=reference, max_new_tokens=24).tokens
    fused = kvkeep.KVKeepCache(model, policy, static=True, kernel="triton", max_new_tokens=24, **params)
    run = kvkeep.generate(model, ids, mask, cache=fused, max_new_tokens=24)
    assert torch.equal(run.tokens, expected) and (run.graph_steps > 0) == CUDA  # CO2 captures after its N steps
    if not CUDA:
        return
    from kvkeep.engine import Request, build
    from kvkeep.policies import make_policy

    class NoText:
        def decode(self, ids, skip_special_tokens=True):
            return ""

    engine = build(model, NoText(), make_policy(policy, **params), max_prompt=64, max_tokens=24, rows=2)
    served = engine.run([Request(row[m.bool()].tolist(), 24) for row, m in zip(ids, mask, strict=True)])
    assert [r.output_ids for r in served] == expected.tolist()


@needs_cuda
@pytest.mark.parametrize("policy", ["full", "window", "h2o", "keyformer", "co2"])
def test_a_prompt_without_padding_never_waits_for_the_gpu(policy):
    """Every layer's prompt bookkeeping (budgets, padding, scores, eviction) runs without a host synchronisation
    when the prompt has no padding (the engine's prefill), so it overlaps the model's own kernels."""
    from kvkeep.attention import kvkeep_mask

    model = _model("cuda", torch.bfloat16)
    budget, options = (None, {}) if policy == "full" else (0.5, {"floor": 0})
    cache = kvkeep.KVKeepCache(model, policy, budget, kernel="triton", max_new_tokens=8, **options)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, shape = 300, (1, 2, 300, 16)
    keys, values = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    query = torch.randn(1, 4, n, 16, generator=gen, device="cuda", dtype=torch.bfloat16)

    def prompt():
        mask = kvkeep_mask(1, n, n, device="cuda")
        for idx, layer in enumerate(cache.layers):
            cache.update(keys, values, idx)
            layer.attend(query, mask, 0.25)

    prompt()  # compiles the kernels
    cache.reset()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prompt()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    measuring = budget is None or cache.policy.evict_after() > 0  # full, and CO2 in its measurement steps
    assert cache.layers[0].positions.shape[-1] == (n if measuring else n // 2)


@needs_cuda
@pytest.mark.parametrize("group", [1, 4])
def test_flash_log_sum_exp_gives_the_two_pass_prompt_scores(group):
    """A probability score of a prompt without padding takes each row's log-sum-exp from the flash kernel (with the
    output): output and scores as the SDPA call and the two-pass kernel give them."""
    from kvkeep.attention import causal_attention_lse, plain_attention
    from kvkeep.kernels.prefill import prefill_scores
    from kvkeep.policies import ScoreSpec

    gen = torch.Generator(device="cuda").manual_seed(group)
    n, heads = 1500, 32
    query = torch.randn(2, n, heads, 128, generator=gen, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    keys, values = (
        torch.randn(2, heads // group, n, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2)
    )
    cols = torch.arange(n, device="cuda").expand(2, 1, n)
    out, lse = causal_attention_lse(query, keys, values, 128**-0.5)
    expected = plain_attention(query, keys, values, cols, cols[:, 0], 128**-0.5, dense=True)
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    spec = ScoreSpec(head_reduce="sum")
    two_pass = prefill_scores(query, keys, cols, 128**-0.5, spec=spec)
    one_pass = prefill_scores(query, keys, cols, 128**-0.5, spec=spec, lse=lse)
    torch.testing.assert_close(one_pass, two_pass, rtol=2e-3, atol=1e-4)
