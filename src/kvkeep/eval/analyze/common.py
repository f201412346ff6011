"""What every analysis measures with: generation under a policy (watched through the cache's ``observer``),
full-attention probabilities (through :func:`kvkeep.attention.probe`) and model facts."""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

import torch

from ...attention import probe
from ...cache import Eviction, KVKeepCache
from ...generation import generate, stop_token_ids
from ...hf import switched
from ...policies import POLICIES
from ...shapes import AttentionShape

DEFAULT_POLICY, DEFAULT_BUDGET = "co2", 0.5

#: ``callback(layer, probs [q_heads, n, n], allowed [n, n])`` of :func:`full_attention`.
LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


# -- full-attention probabilities ---------------------------------------------------------------------
def full_attention(model: torch.nn.Module, input_ids: torch.Tensor, callback: LayerCallback) -> None:
    """One cache-less forward of ``input_ids [1, n]``; ``callback(layer, probs, allowed)`` for every layer.

    ``probs`` is ``[q_heads, n, n]`` float32 (zero where a query may not attend), ``allowed`` ``[n, n]`` bool
    (causal, and within the window on sliding layers). Only one layer's probabilities are held at a time.
    """
    layers = AttentionShape.of(model).known().layers
    ids = as_ids(input_ids, model)
    calls = []

    def on_layer(probs: torch.Tensor, allowed: torch.Tensor) -> None:
        callback(len(calls), probs[0], allowed[0])
        calls.append(None)

    with torch.inference_mode(), switched(model), probe(on_layer):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if len(calls) != layers:
        raise RuntimeError(f"expected {layers} attention calls in one forward, saw {len(calls)}")


# -- generation under a policy, observed through the cache's observer -------------------------------------
@dataclass
class Generation:
    """A greedy generation: the whole sequence and its cache (the last token is never fed)."""

    ids: torch.Tensor  # [1, prompt + new]
    prompt_tokens: int
    new_tokens: int
    cache: KVKeepCache

    @property
    def steps(self) -> int:
        """Decode forwards: step s (1-based, ``Eviction.step``) feeds the s-th generated token."""
        return self.new_tokens - 1

    def query_col(self, step: int) -> int:
        return self.prompt_tokens + step - 1


@dataclass(frozen=True)
class PolicyRun:
    """The generation an analysis watches: greedy, through a :class:`KVKeepCache` of ``policy`` at ``budget``
    (none for ``full``) with ``params``, up to ``max_new_tokens`` (stopping at end of sequence unless
    ``stop_at_eos`` is false).  The policy analyses take these fields as keyword arguments."""

    policy: str = DEFAULT_POLICY
    budget: float | int | None = DEFAULT_BUDGET
    params: dict | None = None
    max_new_tokens: int = 64
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}': choose one of {', '.join(POLICIES)}")

    @property
    def cache_budget(self) -> float | int | None:
        return None if self.policy == "full" else self.budget

    def generate(
        self, model: torch.nn.Module, input_ids, on_evict: Callable[[Eviction], None] | None = None
    ) -> Generation:
        """The :class:`Generation`; ``on_evict`` sees every eviction (the cache's ``observer``)."""
        ids = as_ids(input_ids, model)
        cache = KVKeepCache(model, self.policy, observer=on_evict, budget=self.cache_budget, **(self.params or {}))
        stop = stop_token_ids(model) if self.stop_at_eos else None
        run = generate(model, ids, cache=cache, max_new_tokens=self.max_new_tokens, stop_ids=stop)
        generated = run.row(0)
        full = torch.cat([ids, torch.tensor([generated], dtype=ids.dtype, device=ids.device)], dim=1)
        return Generation(full, ids.shape[1], len(generated), cache)

    def require_decode_step(self, kind: str) -> None:
        """Refuse a generation too short for ``kind`` to see one decode step."""
        if self.max_new_tokens < 2:
            raise ValueError(f"{kind} needs --max-new-tokens >= 2 (one decode step at least)")


def decode_eviction(event: Eviction, policy: str, layers: Container[int]) -> bool:
    """Whether ``event`` is a decode-step eviction (not the prompt's) by ``policy`` on one of ``layers``."""
    return event.step >= 1 and event.layer_idx in layers and event.policy == policy


def dropped(event: Eviction) -> torch.Tensor:
    """``[kv_heads, slots]`` bool: the slots of ``event.before`` holding a token this eviction dropped."""
    before, after = event.before, event.after
    gone = torch.zeros_like(before, dtype=torch.bool)
    for h in range(before.shape[0]):
        gone[h] = (before[h] >= 0) & ~torch.isin(before[h], after[h][after[h] >= 0])
    return gone


# -- model facts --------------------------------------------------------------------------------------
def as_ids(input_ids, model: torch.nn.Module) -> torch.Tensor:
    """``input_ids`` as a ``[1, n]`` long tensor on the model's device."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"analyses take one prompt: input_ids of shape [1, n], got {list(ids.shape)}")
    return ids.to(model.device)


def pick(values: Sequence[int] | None, size: int, what: str, default: Sequence[int]) -> list[int]:
    """Indices in ``range(size)`` (negative ones count from the end), deduplicated, in the given order."""
    chosen = []
    for v in default if values is None else values:
        index = v + size if v < 0 else v
        if not 0 <= index < size:
            raise ValueError(f"{what} {v} is out of range: the model has {size} (0..{size - 1})")
        if index not in chosen:
            chosen.append(index)
    if not chosen:
        raise ValueError(f"choose at least one {what}")
    return chosen
