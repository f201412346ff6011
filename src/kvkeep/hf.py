"""Everything that touches transformers' moving or private corners, in one place.

transformers 5.24 renamed the cache argument of model forwards, ``generate`` and attention modules from
``past_key_values`` to ``cache`` (the old name is deprecated: removed from forwards in 5.40, from
``generate`` in 6.0).  kvkeep supports 5.17 through the newest 5.x, so it asks the installed version
which name it takes instead of hard-coding either.
"""

from __future__ import annotations

import functools
import inspect

import torch

#: The cache argument's old name, still accepted (with a FutureWarning) by transformers >= 5.24.
OLD_CACHE_ARG = "past_key_values"
NEW_CACHE_ARG = "cache"


@functools.cache
def _forward_takes_cache(forward_cls: type) -> bool:
    return NEW_CACHE_ARG in inspect.signature(forward_cls.forward).parameters


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
