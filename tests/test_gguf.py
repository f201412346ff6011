"""GGUF files as models: named directly or through their folder, dequantised once into a content-keyed cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smollm2_available
from tiny_gguf import HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, tokenizer_fields, write_tiny_llama
from transformers import LlamaForCausalLM

import kvkeep
from kvkeep import models
from kvkeep.cli import main

pytestmark = pytest.mark.skipif(not smollm2_available(), reason="the tokenizer is copied from SmolLM2's GGUF")


@pytest.fixture(scope="module")
def tokenizer() -> dict:
    return tokenizer_fields()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> tuple[Path, dict]:
    """A folder holding one tiny Llama GGUF (and nothing else), and the tensors written into it."""
    folder = tmp_path_factory.mktemp("gguf-llama")
    tensors = write_tiny_llama(folder / "tiny-llama.gguf", tokenizer, seed=0)
    return folder / "tiny-llama.gguf", tensors


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "kvkeep-cache"
    monkeypatch.setenv("KVKEEP_CACHE", str(root))
    return root


def converted(root: Path) -> list[str]:
    """The names of the converted models in the cache (no temporary folders among them)."""
    folder = root / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "_convert_gguf", fail)


def embedding(model) -> np.ndarray:
    return model.get_input_embeddings().weight.detach().numpy()


def test_gguf_file_and_its_folder_load_generate_and_reuse_one_cached_copy(
    tiny, cache_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    path, tensors = tiny
    model, tok = kvkeep.load_model(str(path), device="cpu")
    assert "converting tiny-llama.gguf" in capsys.readouterr().err
    assert isinstance(model, LlamaForCausalLM) and not model.training
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (HIDDEN, LAYERS, HEADS)
    assert (config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) == (KV_HEADS, VOCAB, 64)
    # F32 tensors come back exactly (the q/k projections are re-permuted by transformers, the rest are not).
    np.testing.assert_array_equal(embedding(model), tensors["token_embd.weight"])
    down = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(down, tensors["blk.1.ffn_down.weight"])
    assert len(tok) == VOCAB and tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert tok.model_max_length == 64
    assert tok.decode(tok("The lighthouse stood")["input_ids"]) == "The lighthouse stood"
    [entry] = converted(cache_root)
    assert entry.startswith("gguf-")

    ids = tok(["The lighthouse stood", "at the edge of the cliff"], return_tensors="pt", padding=True)
    cache = kvkeep.KVKeepCache(model, "h2o", budget=0.5, floor=0)
    run = kvkeep.generate(model, ids["input_ids"], ids["attention_mask"], cache=cache, max_new_tokens=5)
    assert run.tokens.shape == (2, 5) and int(run.tokens.max()) < VOCAB
    plain = kvkeep.generate(model, ids["input_ids"], ids["attention_mask"], max_new_tokens=5)
    full = kvkeep.generate(
        model, ids["input_ids"], ids["attention_mask"], cache=kvkeep.KVKeepCache(model), max_new_tokens=5
    )
    assert torch.equal(full.tokens, plain.tokens)

    no_conversion(monkeypatch)  # from now on, every load must read the cached copy
    again, _ = kvkeep.load_model(str(path.parent), device="cpu")  # the folder holding the one GGUF file
    np.testing.assert_array_equal(embedding(again), tensors["token_embd.weight"])
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    kvkeep.load_model(str(copy), device="cpu")  # same content, another path: the same cache entry
    assert converted(cache_root) == [entry]


def test_different_content_gets_its_own_cache_entry(tiny, tokenizer, cache_root: Path, tmp_path: Path) -> None:
    path, tensors = tiny
    target = tmp_path / "model.gguf"
    shutil.copy(path, target)
    kvkeep.load_model(str(target), device="cpu")
    [first] = converted(cache_root)
    other = write_tiny_llama(target, tokenizer, seed=1)  # the same path, rewritten with other weights
    model, _ = kvkeep.load_model(str(target), device="cpu")
    assert len(converted(cache_root)) == 2 and first in converted(cache_root)
    np.testing.assert_array_equal(embedding(model), other["token_embd.weight"])
    assert not np.array_equal(other["token_embd.weight"], tensors["token_embd.weight"])
    index = json.loads((cache_root / "gguf-index.json").read_text())
    assert len(set(index.values())) == 2


def test_cli_takes_a_gguf_file_or_its_folder(tiny, cache_root: Path, capsys) -> None:
    path, _ = tiny
    results = []
    for model in (str(path), str(path.parent)):
        status = main(["generate", "--model", model, "--prompt", "The lighthouse", "--max-new-tokens", "3", "--json"])
        out, err = capsys.readouterr()
        assert status == 0, err
        results.append(json.loads(out))
        assert results[-1]["model"] == model and results[-1]["new_tokens"] >= 1
    file, folder = results
    assert file["prompt_tokens"] == folder["prompt_tokens"] > 1 and file["text"] == folder["text"]
    assert len(converted(cache_root)) == 1


def assert_one_line(err: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_the_config_of_a_new_gguf_comes_from_its_metadata_without_converting(tiny, cache_root: Path) -> None:
    path, _ = tiny
    config = models.load_config(str(path))  # what kvkeep checks before it loads (refusals come from here)
    assert config.model_type == "llama" and config.num_hidden_layers == 2
    assert converted(cache_root) == []


def test_a_file_that_is_not_gguf_is_refused_before_anything_is_converted(cache_root: Path, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model")
    for name in (fake, tmp_path):  # the file, and the folder holding it
        with pytest.raises(ValueError) as err:
            kvkeep.load_model(str(name), device="cpu")
        assert_one_line(err, str(fake), "not a GGUF file", "download it again")
    assert converted(cache_root) == []


def test_a_truncated_gguf_is_a_one_line_error_and_leaves_no_cache(tiny, cache_root: Path, tmp_path: Path) -> None:
    path, _ = tiny
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        kvkeep.load_model(str(truncated), device="cpu")
    assert_one_line(err, str(truncated), "damaged or truncated")
    assert converted(cache_root) == []


def test_an_architecture_transformers_cannot_read_is_a_one_line_error(cache_root: Path, tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError) as err:
        kvkeep.load_model(str(path), device="cpu")
    assert_one_line(err, f"cannot read GGUF file {path}", "no-such-arch")
    assert converted(cache_root) == []
