"""The one reading of a model's attention shape: decoder layers, query heads, KV heads and head size.

transformers' configs spell these alike through their ``attribute_map`` (GPT-2's ``n_head`` reads as
``num_attention_heads``).  A config without ``num_key_value_heads`` has one KV head per query head; one
without ``head_dim`` splits ``hidden_size`` evenly over its query heads.
"""

from __future__ import annotations

from dataclasses import dataclass


def text_config(model_or_config):
    """The decoder's config of a model or config (a multimodal model's text part)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


@dataclass(frozen=True)
class AttentionShape:
    """The attention shape of a model, over all its ranks; a field is None where the config does not say.

    Attributes:
        layers: decoder layers.
        heads, kv_heads: query heads and KV heads (``heads`` a multiple of ``kv_heads``).
        head_dim: size of one head's key and value.
    """

    layers: int | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None

    @classmethod
    def of(cls, model_or_config) -> AttentionShape:
        """Read from a model or its config."""
        config = text_config(model_or_config)
        heads = _int(getattr(config, "num_attention_heads", None))
        kv_heads = _int(getattr(config, "num_key_value_heads", None)) or heads
        head_dim = _int(getattr(config, "head_dim", None))
        hidden = _int(getattr(config, "hidden_size", None))
        if head_dim is None and hidden is not None and heads:
            head_dim = hidden // heads
        return cls(_int(getattr(config, "num_hidden_layers", None)), heads, kv_heads, head_dim)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.known().heads // self.kv_heads

    def known(self) -> AttentionShape:
        """Itself, or a one-line ``ValueError`` naming what the config does not state."""
        missing = [name for name in ("layers", "heads", "kv_heads", "head_dim") if getattr(self, name) is None]
        if missing:
            raise ValueError(f"cannot tell this model's attention shape: its config lacks {', '.join(missing)}")
        return self


def _int(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
