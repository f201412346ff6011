"""Every policy on the real SmolLM2-135M: equivalence with full attention, fluent text at half the
budget on CNN/DM articles, and a cache that stays at its budget while decoding."""

from __future__ import annotations

import json

import pytest
import torch

from kvkeep import KVKeepCache
from kvkeep.eval.data import data_root
from kvkeep.hf import with_cache
from kvkeep.models import MODELS, find_gguf, load_model, model_cache_dir

pytestmark = pytest.mark.slow

DATA = data_root()  # $KVKEEP_DATA, else the shared data folder beside the repository
CNNDM = DATA / "summarization" / "summeval_cnndm_100.jsonl"
ARTICLES, WORDS = 2, 250
INSTRUCTION = "Summarize the following news article in 3 sentences.\n\n"

#: Budgets that cover prompt + generation: nothing is evicted, so every policy must equal full attention.
COVERING = {
    "window": {"budget": 4096},
    "streaming": {"budget": 4096},
    "h2o": {"budget": 4096},
    "keyformer": {"budget": 4096},
    "co2": {"budget": 4096, "N": 0},
}
#: Half the prompt; CO2 with its default measurement step and with none.
HALF = {
    "window": {"budget": 0.5, "floor": 0},
    "streaming": {"budget": 0.5, "floor": 0},
    "h2o": {"budget": 0.5, "floor": 0},
    "keyformer": {"budget": 0.5, "floor": 0},
    "co2": {"budget": 0.5, "floor": 0},
    "co2-N0": {"budget": 0.5, "N": 0, "floor": 0},
}

# A data-free prompt for the decoding loop (no shared data needed).
PARAGRAPH = (
    "The lighthouse stood on a rocky point at the mouth of the harbour. For more than a century its keepers "
    "climbed the spiral stairs every evening to light the lamp, wind the clockwork that turned the lens, and "
    "write the weather in a leather logbook. Ships coming home through the autumn storms looked for its beam "
    "long before they could see the town. When the light was automated, the last keeper moved to a cottage "
    "by the quay, where he still tells visitors about the night the fog was so thick that he rang the bell "
    "by hand until morning."
)


@pytest.fixture(scope="module")
def smollm2():
    if not model_cache_dir("smollm2").is_dir():
        try:
            find_gguf(MODELS["smollm2"])
        except ValueError as err:
            pytest.skip(f"SmolLM2 is not available: {err}")
    model, tok = load_model("smollm2", device="cpu")
    return model, tok


@pytest.fixture(scope="module")
def articles() -> list[str]:
    if not CNNDM.is_file():
        pytest.skip(
            f"CNN/DM data not found at {CNNDM}: set KVKEEP_DATA to a folder holding "
            "summarization/summeval_cnndm_100.jsonl (the project's shared data; see README's evaluation section)"
        )
    with CNNDM.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(ARTICLES), strict=False)]
    return [" ".join(row["article"].split()[:WORDS]) for row in rows]


def chat_inputs(tok, text: str) -> dict:
    messages = [{"role": "user", "content": INSTRUCTION + text}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(prompt, return_tensors="pt", add_special_tokens=False)


def generate(model, tok, inputs: dict, cache: KVKeepCache, new_tokens: int) -> list[int]:
    cache.set_generation_length(new_tokens)  # as KVKeepCache(..., max_new_tokens=N) does
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            **with_cache(model, cache),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def full_outputs(smollm2, articles) -> list[list[int]]:
    """Full-attention greedy tokens (32) of each article."""
    model, tok = smollm2
    return [generate(model, tok, chat_inputs(tok, a), KVKeepCache(model, "full"), 32) for a in articles]


@pytest.mark.parametrize("policy", list(COVERING))
def test_covering_budget_equals_full(smollm2, articles, full_outputs, policy) -> None:
    model, tok = smollm2
    name, params = policy, COVERING[policy]
    for i, article in enumerate(articles):
        tokens = generate(model, tok, chat_inputs(tok, article), KVKeepCache(model, name, **params), 20)
        assert tokens == full_outputs[i][:20], f"{policy} differs from full on article {i}: " + repr(
            (tok.decode(tokens), tok.decode(full_outputs[i][:20]))
        )


def longest_run(tokens: list[int]) -> int:
    best = run = 0
    for i, t in enumerate(tokens):
        run = run + 1 if i and t == tokens[i - 1] else 1
        best = max(best, run)
    return best


def assert_fluent(text: str, tokens: list[int], label: str) -> None:
    stripped = text.strip()
    assert stripped, f"{label}: empty output"
    assert len(stripped.split()) >= 5, f"{label}: fewer than 5 words: {text!r}"
    plain = sum(c.isspace() or (c.isprintable() and (c.isascii() or c.isalpha())) for c in stripped)
    assert plain >= 0.8 * len(stripped), f"{label}: mostly non-text characters: {text!r}"
    assert longest_run(tokens) <= 8, f"{label}: a token repeats more than 8 times in a row: {text!r}"


@pytest.mark.parametrize("policy", list(HALF))
def test_half_budget_is_fluent(smollm2, articles, full_outputs, policy, record_property) -> None:
    from rouge_score import rouge_scorer

    model, tok = smollm2
    name, params = policy.split("-")[0], HALF[policy]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    scores = []
    for i, article in enumerate(articles):
        cache = KVKeepCache(model, name, **params)
        tokens = generate(model, tok, chat_inputs(tok, article), cache, 32)
        text = tok.decode(tokens, skip_special_tokens=True)
        assert_fluent(text, tokens, f"{policy} on article {i}")
        assert cache.nbytes() <= 0.55 * cache.full_nbytes(), f"{policy}: {cache.nbytes()} of {cache.full_nbytes()}"
        full_text = tok.decode(full_outputs[i], skip_special_tokens=True)
        scores.append(scorer.score(full_text, text)["rouge1"].fmeasure)
        print(f"SmolLM2 {policy} article {i}: {text!r}")
    record_property("rouge1_vs_full", scores)
    print(f"SmolLM2 ROUGE-1 vs full: {policy} " + " ".join(f"{s:.3f}" for s in scores))


def test_window_nbytes_stay_at_budget(smollm2) -> None:
    model, tok = smollm2
    inputs = chat_inputs(tok, PARAGRAPH)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = KVKeepCache(model, "window", budget=0.5, floor=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, **with_cache(model, cache), use_cache=True).logits
        kept, full = cache.nbytes(), cache.full_nbytes()
        assert 0 < kept <= 0.55 * full
        for _ in range(5):
            next_id = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(next_id)], dim=-1)
            logits = model(input_ids=next_id, attention_mask=mask, **with_cache(model, cache), use_cache=True).logits
            assert cache.nbytes() == kept
            assert cache.full_nbytes() > full
            full = cache.full_nbytes()
    assert cache.get_seq_length() == ids.shape[1] + 5
