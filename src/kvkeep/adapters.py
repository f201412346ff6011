"""Switching a model to kvkeep's attention, and the two architectures that need an adapter.

Most transformers models call attention through ``AttentionInterface``; kvkeep registers itself there
and the model is switched with ``set_attn_implementation("kvkeep")``.  MPT and GPT-J compute attention
inside their attention module, so each gets a small subclass whose only change is to route that
computation through :func:`kvkeep.attention.kvkeep_attention` (MPT also hands over its ALiBi slopes, so
kept keys are biased by their true distance).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.gptj.modeling_gptj import GPTJAttention
from transformers.models.mpt.modeling_mpt import MptAttention, build_mpt_alibi_tensor

from .attention import ATTN_NAME, kvkeep_attention, kvkeep_mask
from .hf import cache_from

#: model_type -> family name, for the architectures kvkeep is tested on.
INTERFACE_MODELS = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma3_text": "Gemma 3",
    "gpt2": "GPT-2 / Cerebras-GPT",
    "opt": "OPT",
    "gpt_neox": "GPT-NeoX / Pythia",
}


class MptKVKeepAttention(MptAttention):
    """MPT attention whose softmax(QK^T + ALiBi)V runs through kvkeep (weights untouched)."""

    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        # transformers < 5.24 passes the cache as ``past_key_values`` (a keyword), >= 5.24 as ``cache``
        cache = cache_from(kwargs, cache=cache)
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
    """GPT-J attention whose ``_attn`` runs through kvkeep (projections and rotary untouched)."""

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
    if not hasattr(GPTJAttention, "_attn"):  # transformers >= 5.24: GPT-J calls the AttentionInterface
        model.set_attn_implementation(ATTN_NAME)
        return
    for module in model.modules():
        if isinstance(module, GPTJAttention):
            module.__class__ = GPTJKVKeepAttention


ADAPTED_MODELS = {"mpt": ("MPT", _adapt_mpt), "gptj": ("GPT-J", _adapt_gptj)}

SUPPORTED = {**INTERFACE_MODELS, **{k: name for k, (name, _) in ADAPTED_MODELS.items()}}

_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, kvkeep_attention)
        AttentionMaskInterface.register(ATTN_NAME, kvkeep_mask)
        _registered = True


def check_supported(model: torch.nn.Module) -> str:
    """Return the model's ``model_type``; raise a one-line error naming the supported families otherwise."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        families = ", ".join(sorted(set(SUPPORTED.values())))
        raise ValueError(f"kvkeep does not support model type '{model_type}': supported families are {families}")
    return model_type


def install(model: torch.nn.Module) -> None:
    """Route the model's attention through kvkeep (idempotent)."""
    model_type = check_supported(model)
    _register()
    if model.config._attn_implementation == ATTN_NAME:
        return
    if model_type in ADAPTED_MODELS:
        ADAPTED_MODELS[model_type][1](model)
        model.config._attn_implementation_internal = ATTN_NAME
    else:
        model.set_attn_implementation(ATTN_NAME)
