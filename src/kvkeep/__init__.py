"""kvkeep: keep only the KV-cache tokens that matter, and physically drop the rest.

    import kvkeep
    model, tok = kvkeep.load_model("smollm2")
    cache = kvkeep.KVKeepCache(model, policy="keyformer", budget=0.5, max_new_tokens=128)
    out = model.generate(**tok(prompts, return_tensors="pt", padding=True), **kvkeep.with_cache(model, cache),
                         max_new_tokens=128)

The names below load on first use, so ``import kvkeep`` (and ``kvkeep --version``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "KVKeepCache": "cache",
    "KVKeepLayer": "cache",
    "Generation": "generation",
    "generate": "generation",
    "stop_token_ids": "generation",
    "unsupported_reason": "hf",
    "install": "hf",
    "with_cache": "hf",
    "load_model": "models",
    "POLICIES": "policies",
    "Policy": "policies",
    "make_policy": "policies",
    "Sampling": "sampling",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvkeep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
