"""Tests for ``kvkeep analyze``: the five analyses on a tiny Llama (token ids, no tokenizer) and a CLI smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import greedy, random_prompt, tiny_model

from kvkeep import KVKeepCache
from kvkeep.eval.analyze import (
    CATEGORIES,
    THRESHOLDS,
    analyze_cached,
    analyze_heatmap,
    analyze_replacement,
    analyze_scores,
    analyze_sparsity,
    full_attention,
)

PNG = b"\x89PNG\r\n\x1a\n"
PROMPT, NEW = 40, 12  # 40 prompt tokens, 12 new tokens: 11 decode steps
STEPS = NEW - 1


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ids():
    return random_prompt(PROMPT)


def read(out: Path, kind: str) -> dict:
    assert (out / f"{kind}.png").read_bytes()[:8] == PNG
    return json.loads((out / f"{kind}.json").read_text())


def test_probabilities_match_eager(llama, ids) -> None:
    """The captured probabilities are those of transformers' eager attention (output_attentions)."""
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(input_ids=ids, output_attentions=True).attentions
    seen = {}
    full_attention(llama, ids, lambda layer, probs, allowed: seen.update({layer: (probs.clone(), allowed.clone())}))
    assert sorted(seen) == [0, 1]
    for layer, (probs, allowed) in seen.items():
        torch.testing.assert_close(probs, reference[layer][0], atol=1e-5, rtol=1e-4)
        assert torch.equal(allowed, torch.ones(PROMPT, PROMPT, dtype=torch.bool).tril())


@pytest.mark.parametrize("arch", ["gpt2", "mpt", "gemma3"])
def test_probabilities_other_architectures(arch) -> None:
    """Adapted (MPT: ALiBi) and hybrid sliding (Gemma 3) models: one call per layer, rows are distributions."""
    model = tiny_model(arch)
    calls = []

    def check(layer, probs, allowed):
        calls.append(layer)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
        assert not bool((probs * ~allowed).any())

    full_attention(model, random_prompt(20), check)
    assert calls == list(range(len(calls))) and len(calls) == model.config.get_text_config().num_hidden_layers


def test_sparsity(llama, ids, tmp_path: Path) -> None:
    result = analyze_sparsity(llama, None, ids, out=tmp_path, max_new_tokens=NEW, stop_at_eos=False)
    assert read(tmp_path, "sparsity")["per_layer"] == result["per_layer"]
    assert result["thresholds"] == list(THRESHOLDS) and result["sequence_tokens"] == PROMPT + NEW
    assert [row["layer"] for row in result["per_layer"]] == [0, 1]
    for row in result["per_layer"]:
        for key in ("share_below", "pooled_below"):
            shares = row[key]
            assert all(0.0 <= s <= 1.0 for s in shares)
            assert shares == sorted(shares)  # a higher threshold can only catch more scores
        assert row["share_below"][-1] > 0  # random attention has small scores


def test_heatmap(llama, ids, tmp_path: Path) -> None:
    result = analyze_heatmap(
        llama, None, ids, out=tmp_path, layers=[0, -1], heads=[0, 3], max_new_tokens=NEW, stop_at_eos=False
    )
    assert read(tmp_path, "heatmap")["maps"] == result["maps"]
    assert result["layers"] == [0, 1] and result["heads"] == [0, 3]
    assert [(m["layer"], m["head"]) for m in result["maps"]] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    for m in result["maps"]:
        assert 0 < m["first_token_mass"] < 1 and 0 < m["local_mass"] <= 1 + 1e-6
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        analyze_heatmap(llama, None, ids, out=tmp_path, layers=[5], max_new_tokens=2)


#: The tests' prompts are far shorter than the default floor of 256 tokens.
NO_FLOOR = {"floor": 0}


def test_cached_counts_add_up(llama, ids, tmp_path: Path) -> None:
    result = analyze_cached(
        llama, None, ids, out=tmp_path, policy="h2o", budget=0.5, params=NO_FLOOR, max_new_tokens=NEW,
        stop_at_eos=False, layer=1,
    )  # fmt: skip
    assert read(tmp_path, "cached")["totals"] == result["totals"]
    kv_heads = result["kv_heads"]
    # (step, layer, KV head, token so far): step s's query is column PROMPT + s - 1, so PROMPT + s tokens so far
    per_layer = kv_heads * sum(PROMPT + s for s in range(1, STEPS + 1))
    for row in result["per_layer"]:
        assert sum(row[c] for c in CATEGORIES) == row["total"] == per_layer
    assert result["totals"]["total"] == 2 * per_layer
    assert result["totals"]["activated_evicted"] > 0 and result["totals"]["activated_kept"] > 0
    # kept per (step, KV head) is the budget (k = 20) plus the newcomer; the view covers every step
    view = result["view"]["per_step"]
    assert [v["step"] for v in view] == list(range(1, STEPS + 1))
    for v in view:
        assert v["activated_kept"] + v["kept_inactive"] == PROMPT // 2 + 1
        assert sum(v[c] for c in CATEGORIES) == v["query_col"] + 1


def test_cached_full_attention_evicts_nothing(llama, ids, tmp_path: Path) -> None:
    result = analyze_cached(llama, None, ids, out=tmp_path, policy="full", max_new_tokens=6, stop_at_eos=False)
    assert result["totals"]["activated_evicted"] == result["totals"]["inactive_evicted"] == 0
    assert result["activated_recall"] == 1.0


def _decode_evictions(model, ids, policy: str, **params) -> int:
    """Evictions of the decode steps, from layer.evicted of a cache run by model.generate."""
    cache = KVKeepCache(model, policy, **params)
    greedy(model, ids, cache, new_tokens=NEW)
    k = cache.layers[0].budget[0].item()
    kv_heads = cache.layers[0].positions.shape[1]
    return sum(layer.evicted - (PROMPT - k) * kv_heads for layer in cache.layers)


def test_replacement_counts_match_evictions(llama, ids, tmp_path: Path) -> None:
    result = analyze_replacement(
        llama, None, ids, out=tmp_path, policy="h2o", budget=0.5, params=NO_FLOOR, max_new_tokens=NEW,
        stop_at_eos=False,
    )  # fmt: skip
    assert read(tmp_path, "replacement")["counts"] == result["counts"]
    expected = _decode_evictions(llama, ids, "h2o", budget=0.5, **NO_FLOOR)
    assert expected == STEPS * 2 * 2  # one per decode step, layer and KV head
    assert sum(result["counts"]) == result["evictions"] == result["evicted_delta"] == expected
    assert result["outside_candidates"] == 0 and sum(result["counts_bulk"]) == 0
    assert sum(r["evictions"] for r in result["per_layer"]) == expected
    assert sum(s["evicted"] for s in result["evictions_per_step"]) == expected
    assert len(result["bin_edges"]) == len(result["counts"]) + 1


def test_replacement_bulk_and_scores(llama, ids, tmp_path: Path) -> None:
    """CO2 keeps everything for N steps, then cuts to its budget at once (bulk), then one per step."""
    co2 = {"policy": "co2", "budget": 0.5, "params": {"N": 3, **NO_FLOOR}, "max_new_tokens": NEW, "stop_at_eos": False}
    replacement = analyze_replacement(llama, None, ids, out=tmp_path, **co2)
    steady, bulk = sum(replacement["counts_steady"]), sum(replacement["counts_bulk"])
    assert bulk > 0 and steady > 0 and steady + bulk == replacement["evictions"] == replacement["evicted_delta"]
    assert replacement["evictions_per_step"][0]["step"] == 3

    scores = analyze_scores(llama, None, ids, out=tmp_path, steps=[1, 3, STEPS], **co2)
    assert read(tmp_path, "scores")["evicted"] == scores["evicted"]
    assert scores["evicted"]["count"] == replacement["evictions"]  # the same run: every eviction scored
    assert [s["step"] for s in scores["snapshots"]] == [1, 3, STEPS]
    # before the cut at step 3 every token so far is cached: PROMPT + s tokens per layer and KV head
    assert scores["snapshots"][0]["count"] == (PROMPT + 1) * 2 * 2
    for part in (*scores["snapshots"], scores["evicted"], scores["kept"]):
        assert sum(part["hist"]) == part["count"] - part["zeros"]
    assert 0.0 <= scores["evicted_below_kept_median"] <= 1.0
    assert sum(s["evicted"] for s in scores["per_step"]) == scores["evicted"]["count"]
    with pytest.raises(ValueError, match="keeps no scores"):
        analyze_scores(llama, None, ids, out=tmp_path, policy="window")


@pytest.mark.parametrize("kind", ["sparsity", "heatmap", "cached", "replacement", "scores"])
def test_cli_on_tiny_model(kind, tiny_dir, tmp_path: Path, capsys) -> None:
    """Every analysis through the command line: its options reach the function, the JSON says where it ran."""
    from kvkeep.cli import main

    args = ["analyze", kind, "--model", tiny_dir, "--prompt", "The lighthouse keeper climbed the stairs. " * 12]
    args += ["--max-new-tokens", "6", "--max-prompt-tokens", "48", "--layers", "-1", "--out", str(tmp_path)]
    if kind in ("cached", "replacement", "scores"):
        args += ["--policy", "h2o", "--budget", "0.5", "--param", "sinks=2", "--param", "floor=0"]
    assert main(args) == 0
    result = read(tmp_path, kind)
    assert result["kind"] == kind and result["prompt_tokens"] == 48 and result["source"]["truncated"] is True
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["kvkeep_version"]
    assert result["command_line"].startswith(f"kvkeep analyze {kind}")
    if kind in ("cached", "replacement", "scores"):
        assert result["policy"] == "h2o" and result["budget"] == 0.5 and result["params"]["sinks"] == 2
    layers = {"heatmap": "layers", "replacement": "layers", "scores": "layers"}
    if kind in layers:
        assert result[layers[kind]] == [1]
    if kind == "cached":
        assert result["view"]["layer"] == 1
    assert f"[kvkeep] {kind}: " in capsys.readouterr().err


@pytest.mark.slow
def test_cli_smollm2(tmp_path: Path) -> None:
    from kvkeep.cli import main
    from kvkeep.models import MODELS, find_gguf, model_cache_dir

    if not model_cache_dir("smollm2").is_dir():
        try:
            find_gguf(MODELS["smollm2"])
        except ValueError as err:
            pytest.skip(f"SmolLM2 is not available: {err}")
    prompt = "The lighthouse keeper climbed the stairs every evening to light the lamp. Summarize this in a sentence."
    args = ["analyze", "cached", "--prompt", prompt, "--chat", "--max-new-tokens", "6", "--policy", "h2o"]
    assert main([*args, "--budget", "0.5", "--param", "floor=0", "--layers", "-1", "--out", str(tmp_path)]) == 0
    result = read(tmp_path, "cached")
    assert result["model"] == "smollm2" and result["view"]["layer"] == 29 and result["kv_heads"] == 3
    assert len(result["per_layer"]) == 30 and result["source"]["chat"] is True
    assert result["totals"]["total"] == sum(result["totals"][c] for c in CATEGORIES)
