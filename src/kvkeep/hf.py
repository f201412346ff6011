"""Everything that touches transformers' moving or private corners, in one place.

- The cache argument's name: transformers 5.24 renamed it from ``past_key_values`` to ``cache`` in model
  forwards, ``generate`` and attention modules (the old name is deprecated: removed from forwards in 5.40,
  from ``generate`` in 6.0).  kvkeep supports 5.17 through the newest 5.x, so it asks the installed version.
- Switching a model to kvkeep's attention (``AttentionInterface``), with a small adapter for the models
  that compute attention inside their attention module (MPT; GPT-J before 5.24).
- The per-layer attention types of a config, the devices of a model, the device mesh of a model that
  transformers split for tensor parallelism, and the flag ``generate`` sets on a cache it was handed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.gptj.modeling_gptj import GPTJAttention
from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

from .attention import ATTN_NAME, kvkeep_attention, kvkeep_mask

OLD_CACHE_ARG = "past_key_values"
NEW_CACHE_ARG = "cache"
REUSE_HINT = "call cache.reset() or build a new KVKeepCache for each generation"


# -- the cache argument --------------------------------------------------------------------------------
@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    return NEW_CACHE_ARG in inspect.signature(model_class.forward).parameters


def cache_arg(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward and ``generate`` take a cache: ``cache`` or ``past_key_values``."""
    return NEW_CACHE_ARG if _forward_takes_cache(type(model)) else OLD_CACHE_ARG


def with_cache(model: torch.nn.Module, cache) -> dict:
    """``{cache_arg(model): cache}``: splice into a forward or ``generate`` call, warning-free on every 5.x."""
    return {cache_arg(model): cache}


def cache_from(kwargs: dict, **named) -> object | None:
    """The cache an attention forward received, under either name; ``named`` holds its named parameters.

    Raises ``TypeError`` when both names carry a cache, so a call can never silently drop one.
    """
    found = {k: v for k, v in {**named, **kwargs}.items() if k in (OLD_CACHE_ARG, NEW_CACHE_ARG) and v is not None}
    if len(found) > 1:
        raise TypeError("an attention forward got both `cache` and `past_key_values`: pass one")
    kwargs.pop(OLD_CACHE_ARG, None)
    kwargs.pop(NEW_CACHE_ARG, None)
    return next(iter(found.values()), None)


class ReuseGuard:
    """``generate`` sets ``cache._is_user_defined = True`` on a cache it was handed: refuse a used one there."""

    @property
    def _is_user_defined(self) -> bool:
        return self.__dict__.get("_user_defined", False)

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        if value and self.get_seq_length() > 0:
            raise ValueError(
                f"this KVKeepCache already holds {self.get_seq_length()} tokens of an earlier generation: {REUSE_HINT}"
            )
        self.__dict__["_user_defined"] = value


# -- model facts ---------------------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (its input embedding, where inputs go)."""
    return next(model.parameters()).device


def model_devices(model: torch.nn.Module) -> list[torch.device]:
    """Every device the model's parameters sit on, in order of first use (several under a ``device_map``)."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def tp_mesh(model: torch.nn.Module):
    """The 1-D device mesh of the ranks that ``model``'s tensor parallelism spans, or None.

    transformers keeps it in the private ``_device_mesh`` (with ``_tp_size``): one unnamed dimension in 5.17,
    named ``(pp, fsdp, tp)`` dimensions in later versions.
    """
    mesh = getattr(model, "_device_mesh", None)
    if mesh is None or (getattr(model, "_tp_size", None) or 1) <= 1:
        return None
    if "tp" in (mesh.mesh_dim_names or ()):
        return mesh["tp"]
    return mesh if mesh.ndim == 1 else None


def layer_types(config) -> list[str]:
    """``"full_attention"`` or ``"sliding_attention"`` per decoder layer, as transformers' caches read them."""
    if getattr(config, "num_kv_shared_layers", None):
        raise ValueError("models that share KV caches across layers (Gemma 3n) are not supported by kvkeep")
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"]
        elif getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * config.num_hidden_layers
        else:
            types = ["full_attention"] * config.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported by kvkeep (only full and sliding attention)")
    return list(types)


def window_layers(config) -> tuple[int | None, list[bool]]:
    """``(window, sliding per layer)`` of a hybrid model (some layers slide over ``window`` tokens, the others
    are global): its sliding layers keep their window whatever the budget, in every kvkeep cache.  A model whose
    every layer slides (or none) gives ``(None, [False] * layers)``: its policy governs every layer."""
    types = layer_types(config)
    window = getattr(config, "sliding_window", None)
    if "full_attention" not in types or "sliding_attention" not in types or window is None:
        return None, [False] * len(types)
    return int(window), [kind == "sliding_attention" for kind in types]


def every_layer_slides(config) -> bool:
    """True for a model whose every layer slides over a window (Mistral v0.1 style): slot rows cannot hold
    its window and its policy in one eviction, so the static cache and the server refuse it."""
    return set(layer_types(config)) == {"sliding_attention"} and getattr(config, "sliding_window", None) is not None


# -- switching a model to kvkeep's attention -----------------------------------------------------------
class MptKVKeepAttention(MptAttention):
    """MPT attention whose softmax(QK^T + ALiBi)V runs through kvkeep (weights untouched)."""

    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        cache = cache_from(kwargs, cache=cache)  # ``past_key_values`` before transformers 5.24
        batch, length = hidden_states.shape[:2]
        mixed = self.Wqkv(hidden_states)
        if self.clip_qkv:
            mixed = mixed.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        query, key, value = (
            t.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2) for t in mixed.chunk(3, dim=2)
        )
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out, _ = kvkeep_attention(
            self, query, key, value, attention_mask, scaling=self.softmax_scale, alibi_slopes=self.alibi_slopes
        )
        return self.out_proj(out.reshape(batch, length, -1)), None


class GPTJKVKeepAttention(GPTJAttention):
    """GPT-J attention (transformers < 5.24) whose ``_attn`` runs through kvkeep (projections and rotary untouched)."""

    def _attn(self, query, key, value, attention_mask=None):
        out, _ = kvkeep_attention(self, query, key, value, attention_mask, scaling=1.0 / float(self.scale_attn))
        return out.transpose(1, 2), None


def _adapt_mpt(model: torch.nn.Module) -> None:
    config = model.config
    bias = build_mpt_alibi_tensor(config.n_heads, 2, config.attn_config.alibi_bias_max)  # [H, 1, 2]
    slopes = (bias[:, 0, 1] - bias[:, 0, 0]).float()
    for module in model.modules():
        if isinstance(module, MptAttention):
            module.__class__ = MptKVKeepAttention
            module.alibi_slopes = slopes.to(next(module.parameters()).device)


def _adapt_gptj(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, GPTJAttention):
            module.__class__ = GPTJKVKeepAttention


#: model_type -> (family name, adapter) for the models that compute attention in their own module.
ADAPTED_MODELS = {"mpt": ("MPT", _adapt_mpt)}
if hasattr(GPTJAttention, "_attn"):  # transformers < 5.24; from 5.24 GPT-J calls the AttentionInterface
    ADAPTED_MODELS["gptj"] = ("GPT-J", _adapt_gptj)

#: Config fields that mark a cache kvkeep cannot hold, and why.
_REFUSED_FIELDS = {
    "kv_lora_rank": "multi-head latent attention caches one compressed latent per token, not per-head K/V",
    "num_kv_shared_layers": "layers share one KV cache (Gemma 3n)",
    "add_cross_attention": "cross-attention keys come from an encoder, not from the generated sequence",
}


#: Model types that pass the rules above but fail kvkeep's checks (tests/family_matrix.py), and why.
_REFUSED_TYPES = {
    "diffllama": "differential attention subtracts two attention maps, which kvkeep's one softmax cannot score",
    "doge": "dynamic mask attention adds a learned mask that kvkeep's attention does not apply",
    "jetmoe": "its mixture-of-attention experts do not call attention through transformers' AttentionInterface",
    "moshi": "its generation differs from transformers under kvkeep's full policy (not yet understood)",
}


def causal_lm_class(config) -> type | None:
    """The causal-LM class transformers registers for ``config.model_type`` (None: none)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return None if name is None else getattr(transformers, name, None)


def unsupported_reason(config) -> str | None:
    """Why kvkeep cannot run the model of ``config`` (from the config and transformers' model classes alone,
    no weights), or None.

    A model runs when its attention goes through transformers' ``AttentionInterface`` (the model class says so
    with ``_supports_attention_backend``) over plain per-layer K/V, or when kvkeep has an adapter for it.
    """
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported (kvkeep compresses a decoder's own K/V)"
    text = config.get_text_config(decoder=True)
    if text.model_type in _REFUSED_TYPES:
        return _REFUSED_TYPES[text.model_type]
    try:
        for field, why in _REFUSED_FIELDS.items():
            if getattr(text, field, None):
                return why
        head_dim = getattr(text, "head_dim", None)
    except Exception:  # transformers raises for an attribute that differs from layer to layer
        return "its layers differ in attention shape (a per-layer config)"
    if getattr(text, "v_head_dim", None) not in (None, head_dim):
        return "its keys and values differ in head size"
    if text.model_type not in ADAPTED_MODELS:
        cls = causal_lm_class(config)
        if cls is None:
            return "transformers registers no causal-LM class for it"
        if not getattr(cls, "_supports_attention_backend", False):
            return f"{cls.__name__} computes attention in its own module, not through transformers' AttentionInterface"
    try:
        layer_types(text)
    except ValueError as err:
        return str(err)
    except AttributeError:
        return "its config does not state its decoder layers (num_hidden_layers)"
    return None


@functools.cache
def _register() -> None:
    AttentionInterface.register(ATTN_NAME, kvkeep_attention)
    AttentionMaskInterface.register(ATTN_NAME, kvkeep_mask)


def check_config(config) -> str:
    """The config's ``model_type``; a one-line ``ValueError`` saying why kvkeep cannot run it otherwise."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(f"kvkeep cannot run model type '{getattr(config, 'model_type', None)}': {reason}")
    return config.model_type


def check_supported(model: torch.nn.Module) -> str:
    """:func:`check_config` of the model's config."""
    return check_config(model.config)


def config_layer_types(config) -> list[str]:
    """From a model's config alone (no weights): its layer types (:func:`layer_types`), once kvkeep is known
    to run it (a one-line error otherwise)."""
    check_config(config)
    return layer_types(config.get_text_config(decoder=True))


def install(model: torch.nn.Module) -> None:
    """Route the model's attention through kvkeep in every forward that gets a kvkeep cache (idempotent).

    Any other forward (another cache, or none) runs the attention implementation the model has at that
    moment, so a model on which kvkeep ran keeps transformers' own speed and numerics outside kvkeep.  The
    switch is a forward pre-hook on the model, its body (``model.base_model``) and its decoder that names
    kvkeep's implementation for a call with a kvkeep cache and restores the previous name after it, error or
    not (a cache layer updated without kvkeep's entry raises, so a call that slips past them cannot go
    unnoticed).  Forwards of one model from several threads run one at a time.
    The models kvkeep adapts (MPT; GPT-J before 5.24) run kvkeep's entry in every forward.
    """
    model_type = check_supported(model)
    _register()
    if model_type in ADAPTED_MODELS:
        if model.config._attn_implementation != ATTN_NAME:
            ADAPTED_MODELS[model_type][1](model)
            model.config._attn_implementation_internal = ATTN_NAME
        return
    lock = threading.RLock()
    bodies = (model, model.base_model, model.get_decoder())
    for body in dict.fromkeys(b for b in bodies if isinstance(b, torch.nn.Module) and hasattr(b, "config")):
        if not getattr(body, "_kvkeep_routed", False):
            body.register_forward_pre_hook(_enter, with_kwargs=True)
            body.register_forward_hook(_leave, with_kwargs=True, always_call=True)
            body._kvkeep_routed, body._kvkeep_lock, body._kvkeep_names = True, lock, []


@contextlib.contextmanager
def switched(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every forward of ``model`` runs kvkeep's attention entry, whatever its cache (the
    analyses' :func:`kvkeep.attention.probe` needs it on cache-less forwards); the names are restored after."""
    install(model)
    previous = _switch(model.config, ATTN_NAME)
    try:
        yield
    finally:
        _switch(model.config, previous)


def _switch(config, name: str | list[str]) -> list[str]:
    """Name ``name`` (one, or one per config) as the attention implementation of ``config`` and of its text
    decoder's config (a composite model's layers and mask read the latter); return the names they had."""
    configs = list({id(c): c for c in (config, config.get_text_config(decoder=True))}.values())
    names = [name] * len(configs) if isinstance(name, str) else name
    previous = [c._attn_implementation for c in configs]
    for c, n in zip(configs, names, strict=True):
        c._attn_implementation_internal = n
    return previous


def _enter(body: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """A hooked forward begins: it holds the model's lock (forwards of one model from several threads run one at
    a time, so none sees another's name) and names kvkeep's entry when it got a kvkeep cache."""
    if torch.compiler.is_compiling():  # a compiled forward (transformers compiles for its own static caches only):
        return  # nothing to switch, and no lock for the compiler to break its graph on
    body._kvkeep_lock.acquire()
    body._kvkeep_names.append(None)  # first, so that _leave (called even when this raises) pops this call's
    if any(getattr(value, "routes_to_kvkeep", False) for value in (*args, *kwargs.values())):
        body._kvkeep_names[-1] = _switch(body.config, ATTN_NAME)


def _leave(body: torch.nn.Module, args: tuple, kwargs: dict, output) -> None:
    if torch.compiler.is_compiling():
        return
    try:
        previous = body._kvkeep_names.pop()
        if previous is not None:
            _switch(body.config, previous)
    finally:
        body._kvkeep_lock.release()
