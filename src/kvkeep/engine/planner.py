"""The memory planner: how many rows fit, how wide each is, and how much prompt to prefill at a time.

A row is the engine's unit of memory (as a block is in vLLM): ``capacity`` slots per layer and KV head,
each holding a key and a value (``head_dim`` each), the token's position (int64) and, for scoring policies,
its running score (float32).  The plan gives the memory first to the model's weights, then to a reserve for
one prefill piece and the decode step's workspaces, and divides the rest into rows.  CO2 keeps a request's
whole prompt for its first ``N`` steps, so it also gets a few *wide* rows (the longest prompt plus ``N``
slots) where requests measure before they are cut into an ordinary row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..distributed import tensor_parallel
from ..hf import window_layers
from ..policies import Policy
from ..shapes import AttentionShape, text_config

GIB = 1 << 30
#: Prompt tokens prefilled per engine iteration (between two decode steps), at most.
DEFAULT_PREFILL_TOKENS = 8192
#: Decode-step workspaces (logits, sampling, kernel scratch) and allocator slack, at least.
DECODE_RESERVE = 0.5 * GIB


@dataclass(frozen=True)
class ModelFacts:
    """What a row's size depends on, read from the model's tensors' config."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    weight_bytes: int
    hidden: int
    intermediate: int
    vocab: int
    sliding_layers: int = 0  # a hybrid model's layers that slide over ``window`` tokens (rows of the window)
    window: int = 0

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFacts:
        """The facts of ``model``; under tensor parallelism, of this rank's share (its KV heads, its weights)."""
        config = text_config(model)
        shape = AttentionShape.of(config).known()
        tp = tensor_parallel(model)
        kv_heads = shape.kv_heads if tp is None else tp.local_kv_heads()
        window, sliding = window_layers(config)
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        weights = sum(p.numel() * p.element_size() for p in local)
        return cls(
            layers=shape.layers,
            kv_heads=kv_heads,
            head_dim=shape.head_dim,
            dtype_bytes=next(model.parameters()).element_size(),
            weight_bytes=weights,
            hidden=config.hidden_size,
            intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
            vocab=config.vocab_size,
            sliding_layers=sum(sliding),
            window=window or 0,
        )

    def _head_bytes(self, scores: bool) -> int:
        """Bytes of one slot of one KV head: K and V, its position (int64), its score (float32)."""
        return 2 * self.head_dim * self.dtype_bytes + 8 + (4 if scores else 0)

    def slot_bytes(self, scores: bool) -> int:
        """Bytes of one slot in every layer (a prompt's whole cache, measured per token)."""
        return self.layers * self.kv_heads * self._head_bytes(scores)

    def row_bytes(self, capacity: int, scores: bool) -> int:
        """Bytes of one row of ``capacity`` slots per layer; a hybrid's sliding layers hold ``window`` slots
        (no score)."""
        governed = (self.layers - self.sliding_layers) * self.kv_heads * self._head_bytes(scores)
        return capacity * governed + self.window * self.sliding_layers * self.kv_heads * self._head_bytes(False)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of K and V of ``tokens`` tokens of one sequence, over all layers (what full attention holds;
        a hybrid's sliding layer holds ``window - 1`` of them at most)."""
        held = tokens * (self.layers - self.sliding_layers) + min(tokens, self.window - 1) * self.sliding_layers
        return held * self.kv_heads * 2 * self.head_dim * self.dtype_bytes

    def prefill_bytes(self, tokens: int) -> int:
        """Activation memory of a prefill of ``tokens``, plus its whole-prompt cache (kept by CO2's measurement)."""
        activations = tokens * (6 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        return activations + tokens * self.slot_bytes(scores=True)


@dataclass(frozen=True)
class Plan:
    """Rows of the engine: ``rows`` ordinary rows of ``capacity`` slots, ``wide_rows`` of ``wide_capacity``."""

    rows: int
    capacity: int
    wide_rows: int
    wide_capacity: int
    prefill_tokens: int
    row_bytes: int
    cache_bytes: int
    memory_bytes: int

    def describe(self) -> str:
        wide = f" + {self.wide_rows} measurement rows x {self.wide_capacity} slots" if self.wide_rows else ""
        return (
            f"{self.rows} rows x {self.capacity} slots{wide} ({self.cache_bytes / GIB:.2f} GiB of KV cache in "
            f"{self.memory_bytes / GIB:.2f} GiB), prefill pieces of up to {self.prefill_tokens} tokens"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def row_capacity(policy: Policy, max_prompt: int, max_tokens: int) -> int:
    """Slots a request's row needs: its budget plus the newcomer's slot; a keep-all policy keeps everything."""
    if policy.keeps_all:
        return max_prompt + max_tokens
    return policy.budget_tokens(max_prompt) + 1


def plan(
    facts: ModelFacts,
    policy: Policy,
    *,
    max_prompt: int,
    max_tokens: int,
    memory_bytes: int,
    rows: int | None = None,
    prefill_tokens: int | None = None,
) -> Plan:
    """Choose the rows and the prefill piece for ``memory_bytes`` (weights included).

    ``rows``: a fixed number of ordinary rows instead of as many as fit.  Raises a one-line ``ValueError`` when
    not even one row fits.
    """
    if max_prompt < 1 or max_tokens < 1:
        raise ValueError(f"the longest prompt ({max_prompt}) and max_tokens ({max_tokens}) must be >= 1")
    prefill_tokens = prefill_tokens or max(max_prompt, min(DEFAULT_PREFILL_TOKENS, 4 * max_prompt))
    scores = policy.score_spec() is not None
    capacity = row_capacity(policy, max_prompt, max_tokens)
    row_bytes = facts.row_bytes(capacity, scores)
    wide_capacity = max_prompt + policy.evict_after() + 1 if policy.evict_after() else 0
    wide_bytes = facts.row_bytes(wide_capacity, scores) if wide_capacity else 0
    reserve = facts.prefill_bytes(max(prefill_tokens, max_prompt)) + DECODE_RESERVE
    free = memory_bytes - facts.weight_bytes - reserve
    # Measurement rows: twice the requests expected inside their first N steps at once (N of each request's
    # N + max_tokens steps), at least one; they are paid for out of the same memory.
    share = policy.evict_after() / (policy.evict_after() + max_tokens) if wide_capacity else 0.0
    if rows is None:
        rows = math.floor(free / (row_bytes + 2 * share * wide_bytes)) if free > 0 else 0
    wide_rows = max(1, math.ceil(2 * rows * share)) if wide_capacity else 0
    if wide_capacity:
        rows = min(rows, max(0, math.floor((free - wide_rows * wide_bytes) / row_bytes)))
    if rows < 1:
        need = (facts.weight_bytes + reserve + row_bytes + wide_rows * wide_bytes) / GIB
        raise ValueError(
            f"{memory_bytes / GIB:.2f} GiB holds no row of {capacity} slots: this model, prompt length and budget "
            f"need about {need:.2f} GiB; give more memory (--memory-gib) or lower --max-prompt-tokens"
        )
    cache_bytes = rows * row_bytes + wide_rows * wide_bytes
    return Plan(rows, capacity, wide_rows, wide_capacity, prefill_tokens, row_bytes, cache_bytes, memory_bytes)
