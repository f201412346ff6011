"""The serving engine: continuous batching never changes a request's tokens, rows come back, the planner's sums."""

from __future__ import annotations

import pytest
import torch
from conftest import COVERING, HALF, random_prompt, tiny_model

import kvkeep
from kvkeep.bench.serve import markdown
from kvkeep.engine import ModelFacts, Request, build, plan
from kvkeep.engine.planner import DECODE_RESERVE
from kvkeep.engine.request import Detokenizer
from kvkeep.policies import make_policy
from kvkeep.sampling import Sampling

MODEL = tiny_model("llama")
LENGTHS = (20, 33, 41, 27, 50, 30, 24, 45, 38, 22, 29, 47, 35, 26, 43, 31)  # 16 prompts


class Tokens:
    """A tokenizer stand-in: token ids as text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def engine(policy: str, rows: int = 6, **overrides):
    params = {**HALF[policy], **overrides}
    return build(MODEL, Tokens(), make_policy(policy, **params), max_prompt=64, max_tokens=12, rows=rows)


def prompts() -> list[list[int]]:
    return [random_prompt(n, seed=n)[0].tolist() for n in LENGTHS]


@pytest.mark.parametrize("policy", list(HALF))
def test_sixteen_concurrent_greedy_requests_get_the_tokens_they_get_alone(policy):
    served = engine(policy)
    batched = served.run([Request(p, 12) for p in prompts()])  # 16 requests through 6 rows
    for request, prompt in zip(batched, prompts(), strict=True):
        alone = engine(policy).run([Request(prompt, 12)])[0]
        assert request.output_ids == alone.output_ids, f"batching changed the tokens of a {len(prompt)}-token prompt"
        again = served.run([Request(prompt, 12)])[0]  # alone on the engine that has served the others
        assert again.output_ids == alone.output_ids, f"a used engine changed the tokens of a {len(prompt)}-token prompt"
        # ... and they are the tokens of kvkeep's reference (compacting) path
        cache = kvkeep.KVKeepCache(MODEL, policy, **HALF[policy])
        reference = kvkeep.generate(MODEL, torch.tensor([prompt]), cache=cache, max_new_tokens=12)
        assert request.output_ids == reference.row(0)
        assert request.finish_reason == "length" and len(request.output_ids) == 12


def test_covering_budget_reproduces_full_attention():
    full = engine("full").run([Request(p, 12) for p in prompts()[:6]])
    for policy in ("window", "h2o", "keyformer", "co2"):
        params = {k: v for k, v in COVERING[policy].items() if k != "budget"}
        served = engine(policy, budget=100, **params).run([Request(p, 12) for p in prompts()[:6]])
        assert [r.output_ids for r in served] == [r.output_ids for r in full], policy


def test_sampled_requests_are_reproducible_and_batching_does_not_change_them():
    sampling = [Sampling(temperature=1.0, top_p=0.9, seed=s) for s in range(6)]
    batched = engine("keyformer").run([Request(p, 12, s) for p, s in zip(prompts(), sampling, strict=False)])
    for request, prompt, s in zip(batched, prompts(), sampling, strict=False):
        assert engine("keyformer").run([Request(prompt, 12, s)])[0].output_ids == request.output_ids
    greedy = engine("keyformer").run([Request(p, 12) for p in prompts()[:6]])
    assert [r.output_ids for r in batched] != [r.output_ids for r in greedy]  # the noise does change them


@pytest.mark.parametrize("policy", ["h2o", "co2"])  # co2: the first steps decode in a measurement row
def test_logprobs_batched_with_other_asks_equal_alone_and_the_models_own(policy):
    asks = [None, 1, 3, 0, 2, None]
    requests = [Request(p, 12, logprobs=k, echo=k == 2) for p, k in zip(prompts(), asks, strict=False)]
    batched = engine(policy).run(requests)
    for request, prompt, k in zip(batched, prompts(), asks, strict=False):
        alone = engine(policy).run([Request(prompt, 12, logprobs=k, echo=k == 2)])[0]
        assert request.output_ids == alone.output_ids
        if k is None:
            assert request.output_logprobs == [] and request.prompt_logprobs is None
            continue
        assert len(request.output_logprobs) == 12
        for (lp, best), (lp_alone, best_alone), token in zip(
            request.output_logprobs, alone.output_logprobs, request.output_ids, strict=True
        ):
            assert lp == pytest.approx(lp_alone, abs=1e-5) and [i for i, _ in best] == [i for i, _ in best_alone]
            assert len(best) == k and (not k or (best[0][0] == token and best[0][1] == pytest.approx(lp)))  # greedy
    echoed = batched[4]  # the prompt's log-probabilities: full attention over the prompt
    ids = torch.tensor([prompts()[4]])
    with torch.no_grad():
        expected = torch.log_softmax(MODEL(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert [lp for lp, _ in echoed.prompt_logprobs] == pytest.approx(expected.tolist(), abs=1e-4)


def test_rows_are_freed_and_reused_and_requests_finish_at_a_stop_token():
    served = engine("h2o", rows=2)
    first = served.run([Request(prompts()[0], 12)])[0]
    stop = first.output_ids[3]
    requests = served.run([Request(p, 12, stop_ids={stop}) for p in prompts()[:5]])
    assert requests[0].output_ids == first.output_ids[:4] and requests[0].finish_reason == "stop"
    assert not served.running and served.peak_rows == 2 and served.stats()["rows_in_use"] == 0


def recording(served, log: list) -> None:
    """Log ``("launch", k)`` when the engine launches its k-th decode step and ``("read", k)`` when it reads that
    step's tokens on the host."""
    decode = served.runner.decode

    def launch(*args, **kwargs):
        handoff = decode(*args, **kwargs)
        step = 1 + sum(kind == "launch" for kind, _ in log)
        log.append(("launch", step))
        get = handoff.get
        handoff.get = lambda: log.append(("read", step)) or get()
        return handoff

    served.runner.decode = launch


def test_step_t_plus_1_is_launched_before_step_t_is_read_and_its_tokens_emitted():
    """Asynchronous scheduling: the host turns a step's tokens into events only once the next step is launched,
    and launches no step past a request's known end (as many steps as the synchronous loop)."""
    served = engine("h2o", rows=2)
    log = []
    recording(served, log)
    request = served.run([Request(prompts()[0], 6, on_event=lambda e: log.append(("event", e.token_ids)))])[0]
    tokens = request.output_ids
    expected = [("launch", 1), ("event", tokens[:1])]  # the prefill's token: read after the first launch
    for k in range(2, 6):
        expected += [("launch", k), ("read", k - 1), ("event", tokens[k - 1 : k])]
    assert log == expected + [("read", 5), ("event", tokens[5:])]
    assert request.finish_reason == "length" and served.steps == 5
    stats = served.stats()  # 5 steps timed (a CPU's wall time), 4 iterations from launch to launch
    assert (served.timed_steps, served.iterations) == (5, 4) and stats["step_ms_mean"] > 0
    assert stats["iteration_over_step"] == pytest.approx(stats["iteration_ms_mean"] / stats["step_ms_mean"])
    table = markdown([{"method": "h2o", **stats}], {})
    assert "| iteration / step |" in table and f"| {stats['iteration_over_step']:.2f} |" in table


@pytest.mark.parametrize("policy", ["full", "co2"])  # co2: the stop falls on its token N + 1, where it moves rows
def test_a_request_that_stops_at_step_t_never_emits_the_token_computed_at_t_plus_1(policy):
    """The step after a stop token is launched before the stop is seen; its token is dropped, the row's bytes are
    those after the stop's step (full attention's for these policies) and the row's next request is unharmed."""
    served = engine(policy, rows=1)
    alone = served.run([Request(p, 12) for p in prompts()[:2]])
    stop = alone[0].output_ids[3]  # CO2's N = 3: its 4th token ends its measurement
    log, events = [], []
    recording(served, log)
    stopped, after = served.run(
        [Request(prompts()[0], 12, stop_ids={stop}, on_event=events.append), Request(prompts()[1], 12)]
    )
    assert stopped.finish_reason == "stop" and stopped.output_ids == alone[0].output_ids[:4]
    assert [t for e in events for t in e.token_ids] == stopped.output_ids and events[-1].finish_reason == "stop"
    assert log.index(("launch", 4)) < log.index(("read", 3))  # the token after the stop was computed ...
    assert stopped.computed == 5  # ... and dropped
    assert stopped.kv_bytes == stopped.kv_bytes_peak == stopped.kv_bytes_full
    assert after.output_ids == alone[1].output_ids


def test_cancelled_request_frees_its_row_at_the_next_step():
    served = engine("h2o", rows=2)
    requests = [served.submit(Request(p, 12)) for p in prompts()[:3]]
    served.step()
    assert len(served.running) == 2 and len(served.waiting) == 1
    served.cancel(requests[0])
    served.step()
    assert requests[0].finish_reason == "cancelled" and requests[2].seat is not None  # the row went to the next one
    while served.busy:
        served.step()
    assert [r.finish_reason for r in requests] == ["cancelled", "length", "length"]


def test_co2_measures_in_a_wide_row_then_moves_to_its_compressed_row():
    served = engine("co2", rows=3)
    assert served.plan.wide_rows >= 1 and served.plan.wide_capacity == 64 + 3 + 1
    requests = served.run([Request(p, 12) for p in prompts()[:8]])
    assert served.seats.measuring == 0 and all(r.finish_reason == "length" for r in requests)
    assert all(r.kv_bytes < r.kv_bytes_full for r in requests)
    # Its peak is what the measurement row held at the cut: the prompt and its first N tokens.
    facts = served.facts
    for request in requests:
        assert request.kv_bytes < request.kv_bytes_peak == facts.kv_bytes(request.prompt_tokens + 3)


def test_a_request_that_ends_while_co2_measures_peaks_at_full_attention():
    served = engine("co2", rows=3, N=6)
    requests = served.run([Request(p, 4) for p in prompts()[:4]])
    for request in requests:
        assert request.kv_bytes == request.kv_bytes_peak == request.kv_bytes_full


def test_per_request_prompt_options_and_the_floor():
    """A request's own observe / pool / floor change only its own kept set; the floor is reported."""
    served = engine("keyformer", rows=4, budget=1.0, floor=0)  # rows of 65 slots
    prompt = prompts()[4]  # 50 tokens
    plain, windowed, floored = served.run(
        [Request(prompt, 8, budget=0.5), Request(prompt, 8, budget=0.5, policy_options={"observe": 6, "pool": 3}),
         Request(prompt, 8, budget=0.5, policy_options={"floor": 60})]
    )  # fmt: skip
    cache = kvkeep.KVKeepCache(MODEL, "keyformer", budget=0.5, floor=0, observe=6, pool=3)
    assert windowed.output_ids == kvkeep.generate(MODEL, torch.tensor([prompt]), cache=cache, max_new_tokens=8).row(0)
    assert not plain.floored and not windowed.floored and floored.floored
    assert floored.kv_bytes == floored.kv_bytes_full > plain.kv_bytes == plain.kv_bytes_peak
    with pytest.raises(ValueError, match="pool must be an odd int"):
        served.submit(Request(prompt, 4, policy_options={"pool": 2}))
    with pytest.raises(ValueError, match="does not fit"):
        served.submit(Request(prompt, 4, budget=0.5, policy_options={"floor": 500}))


def test_bad_requests_are_refused_in_one_line():
    served = engine("h2o")
    for request, fragment in [
        (Request([], 4), "empty"),
        (Request(list(range(3, 80)), 4), "more than this server's limit"),
        (Request(prompts()[0], 0), "max_tokens"),
        (Request(prompts()[0], 99), "max_tokens"),
        (Request(prompts()[0], 4, budget=60), "does not fit"),
    ]:
        with pytest.raises(ValueError, match=fragment) as info:
            served.submit(request)
        assert "\n" not in str(info.value)
    assert served.run([Request(prompts()[0], 4)])[0].finish_reason == "length"


def test_planner_arithmetic_equals_the_bytes_the_rows_allocate():
    policy = make_policy("keyformer", budget=0.5, floor=0)
    facts = ModelFacts.of(MODEL)
    row_bytes = 33 * facts.slot_bytes(scores=True)  # budget 32 of a 64-token prompt, plus the newcomer
    memory = facts.weight_bytes + DECODE_RESERVE + facts.prefill_bytes(256) + 10 * row_bytes + row_bytes // 2
    chosen = plan(facts, policy, max_prompt=64, max_tokens=12, memory_bytes=memory)
    assert (chosen.rows, chosen.capacity, chosen.row_bytes, chosen.prefill_tokens) == (10, 33, row_bytes, 256)
    served = build(MODEL, Tokens(), policy, max_prompt=64, max_tokens=12, memory_gib=memory / 2**30)
    assert served.plan == chosen
    allocated = sum(
        t.numel() * t.element_size()
        for layer in served.runner.rows.cache.layers
        for t in (layer.keys, layer.values, layer.positions, layer.scores)
    )
    assert allocated == chosen.cache_bytes == 10 * row_bytes
    co2 = plan(facts, make_policy("co2", budget=0.5, floor=0), max_prompt=64, max_tokens=12, memory_bytes=memory)
    wide_bytes = co2.wide_capacity * facts.slot_bytes(scores=True)
    assert co2.wide_rows >= 1 and co2.cache_bytes == co2.rows * row_bytes + co2.wide_rows * wide_bytes <= memory
    with pytest.raises(ValueError, match="holds no row"):
        plan(facts, policy, max_prompt=64, max_tokens=12, memory_bytes=facts.weight_bytes)


def test_detokenizer_holds_back_text_that_may_start_a_stop_string():
    detok = Detokenizer(Tokens(), ["<3><4>"])
    released = [detok.feed([1, 2, 3][:n], final=False) for n in (1, 2, 3)]
    assert all(len(text) <= len("<1><2><3>") - 5 for text, _ in released[-1:])  # a stop-long tail is held back
    text, stopped = detok.feed([1, 2, 3, 4], final=False)
    assert stopped and "".join(t for t, _ in released) + text == "<1><2>"  # the stop string is not output
    assert Detokenizer(Tokens(), []).feed([5], final=True) == ("<5>", False)
    assert Detokenizer(Tokens(), ["x"]).feed([5, 6], final=True) == ("<5><6>", False)


def test_a_failing_step_ends_every_request_and_refuses_new_ones(monkeypatch):
    server = engine("h2o", rows=2)
    ended = []

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(server.runner, "decode", broken)
    requests = [Request(p, 12, on_event=lambda e: e.finish_reason and ended.append(e)) for p in prompts()[:3]]
    for request in requests:
        server.submit(request)
    server.start()
    server.thread.join(timeout=60)
    assert not server.thread.is_alive()  # the loop ended instead of dying silently mid-request
    assert [r.finish_reason for r in requests] == ["error"] * 3 and len(ended) == 3
    assert "device lost" in requests[0].error and server.stats()["failure"] == requests[0].error
    with pytest.raises(kvkeep.engine.EngineStopped, match="device lost"):
        server.submit(Request(prompts()[0], 4))
    server.stop()


@pytest.mark.parametrize("policy", ["h2o", "co2"])
def test_a_dropped_engine_frees_its_cache_at_once(policy):
    """No reference cycle holds the rows (or, on a GPU, the graphs' memory) until the garbage collector runs."""
    import gc
    import weakref

    served = engine(policy)
    served.run([Request(p, 4) for p in prompts()[:2]])
    runner, cache = weakref.ref(served.runner), weakref.ref(served.runner.rows.cache)
    gc.disable()
    try:
        del served
        assert runner() is None and cache() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("arch", ["gemma3", "gpt_oss"])
@pytest.mark.parametrize("policy", ["full", *HALF])
def test_a_hybrid_sliding_model_is_served_batched_as_alone_and_as_the_compacting_path(arch, policy):
    """Gemma 3's (or gpt-oss's, with learned sinks) sliding layers hold rings of their window in the engine's rows
    (the planner counts them so); batched, alone and kvkeep's compacting path give every request the same tokens."""
    model = tiny_model(arch)
    params = {} if policy == "full" else HALF[policy]
    chosen = make_policy(policy, **params)

    def served():
        return build(model, Tokens(), chosen, max_prompt=64, max_tokens=16, rows=3)

    many = prompts()[:6]
    batched = [r.output_ids for r in served().run([Request(p, 16) for p in many])]
    assert batched == [served().run([Request(p, 16)])[0].output_ids for p in many]
    for tokens, prompt in zip(batched, many, strict=True):
        cache = kvkeep.KVKeepCache(model, chosen, kernel="torch", max_new_tokens=16)
        assert tokens == kvkeep.generate(model, torch.tensor([prompt]), cache=cache, max_new_tokens=16).row(0)
    engine_ = served()
    window, facts = model.config.sliding_window, engine_.facts
    sliding = model.config.layer_types.count("sliding_attention")
    assert (facts.sliding_layers, facts.window) == (sliding, window)
    allocated = sum(
        t.numel() * t.element_size()
        for layer in engine_.runner.rows.cache.layers
        for part in (getattr(layer, "narrow", layer), getattr(layer, "wide", None))
        if part is not None
        for t in (part.keys, part.values, part.positions, part.scores)
        if t is not None
    )
    assert allocated == engine_.plan.cache_bytes
