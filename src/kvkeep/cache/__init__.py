"""kvkeep's cache: :class:`KVKeepCache` and its layers (one class per storage strategy)."""

from .cache import KERNELS, KVKeepCache, resolve_kernel
from .compacting import CompactingLayer
from .layer import Eviction, KVKeepLayer
from .slots import SlotLayer
from .step import StepState

__all__ = [
    "KERNELS",
    "CompactingLayer",
    "Eviction",
    "KVKeepCache",
    "KVKeepLayer",
    "SlotLayer",
    "StepState",
    "resolve_kernel",
]
