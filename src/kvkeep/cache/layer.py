"""What every kvkeep cache layer shares: the policy's per-sequence budget, transformers' layer contract, and
the accounting of what is held.  The storage strategies subclass it (:mod:`.compacting`, :mod:`.slots`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from ..policies import Policy, ScoreSpec

#: A budget beyond any sequence (a huge int budget keeps everything; int64 tensors must still hold it).
NO_LIMIT = 1 << 62


@dataclass
class Eviction:
    """What one eviction saw and did, for observers (the analyses); tensors of the first sequence of the batch.

    Attributes:
        layer_idx, step: where it happened (step 0: the prompt).
        policy: the layer's policy name (hybrid models keep ``full`` on their sliding layers).
        before: ``[kv_heads, slots]`` positions the step attended to (-1: empty).
        scores: ``[kv_heads, slots]`` the running scores it ranked by (None: no score).
        candidates: ``[kv_heads, slots]`` the tokens ranked by score: held, visible, and neither sinks nor in
            the recent window.
        after: ``[kv_heads, slots']`` positions kept.
        evicted: entries (token x KV head) dropped, over the whole batch.
    """

    layer_idx: int
    step: int
    policy: str
    before: torch.Tensor
    scores: torch.Tensor | None
    candidates: torch.Tensor
    after: torch.Tensor
    evicted: int


Observer = Callable[[Eviction], None]


class KVKeepLayer(CacheLayerMixin):
    """One decoder layer's cache under a policy (and, for sliding layers, the model's own window).

    Attributes:
        keys, values: ``[batch, kv_heads, slots, head_dim]``.
        positions: ``[batch, kv_heads, slots]`` int64 true position of each kept token, -1 for an empty slot.
        scores: ``[batch, kv_heads, slots]`` float32 running score (scoring policies only).
        budget, recent: ``[batch]`` int64 tokens each sequence may keep and its protected recent window
            (``budget`` None: no limit).
        padding: ``[batch]`` int64 left padding of each sequence (columns before its first token).
        prompt_tokens: ``[batch]`` real tokens of each prompt, on the host (the budget's base; None before the prompt).
        peak: ``[batch]`` int64 the most entries (token x KV head) each sequence held after any forward so far
            (None before the first; a slot layer's count never falls, so its peak is also what it holds now).
        seen: columns processed (the padded sequence length transformers counts in).
        step: generation step (0 while the prompt is processed).
        head_offset: the model's index of this layer's KV head 0 (under tensor parallelism a rank holds
            heads ``[head_offset, head_offset + kv_heads)``; read from its first K/V with ``tp``, the model's
            :class:`~kvkeep.distributed.TensorParallel` group).
    """

    is_compileable = False
    is_croppable = False
    #: True for layers whose decode step writes into fixed buffers (the cache advances the step state first).
    decodes_in_place = False

    def __init__(
        self, policy: Policy, layer_idx: int, sliding_window: int | None, observer: Observer | None = None, tp=None
    ):
        super().__init__()
        self.tp = tp
        self.policy = policy
        self.spec: ScoreSpec | None = policy.score_spec()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.observer = observer
        self.head_offset = 0
        self.clear()

    def clear(self) -> None:
        """Forget every token (and the batch): the state of a new layer."""
        self.keys = self.values = self.positions = self.scores = None
        self.budget = self.recent = self.padding = self.peak = self.prompt_tokens = None
        self.seen = self.step = self.evicted = 0
        self.is_initialized = False

    def reset(self) -> None:
        self.clear()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.tp is not None:  # the first K/V tell which of the model's heads this rank holds
            self.head_offset = self.tp.head_offset(key_states.shape[1])
        self.is_initialized = True

    # -- transformers' layer contract ---------------------------------------------------------------
    def get_seq_length(self) -> int:
        """The (padded) sequence length seen, not the number kept: new tokens get their true positions."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a KVKeepCache cannot be cropped (evicted tokens are gone); use a new cache")

    # -- host counters around a CUDA graph ------------------------------------------------------------
    def host_counters(self) -> tuple[int, int]:
        """``(seen, step)``, to restore after a decode step is captured (recorded, not run)."""
        return self.seen, self.step

    def restore_host_counters(self, counters: tuple[int, int]) -> None:
        self.seen, self.step = counters

    def replayed_step(self) -> None:
        """A captured decode step was replayed: advance the counters its Python did not run."""
        self.seen += 1
        self.step += 1

    # -- budgets ------------------------------------------------------------------------------------
    def set_budgets(self, prompt_tokens: list[int], device: torch.device) -> list[int] | None:
        """Budget and recent window per sequence, from its real (unpadded) prompt length; returns the budgets (None:
        no limit).  The copies to the device do not wait for it (they are staged from the host at once)."""
        if self.policy.keeps_all:
            return None
        budgets = [min(self.policy.budget_for(n), NO_LIMIT) for n in prompt_tokens]
        self.budget = torch.tensor(budgets, dtype=torch.long).to(device, non_blocking=True)
        recent = [self.policy.recent_size(k) for k in budgets]
        self.recent = torch.tensor(recent, dtype=torch.long).to(device, non_blocking=True)
        return budgets

    # -- reporting ----------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the K/V tensors hold (empty slots included: they are allocated)."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def token_bytes(self) -> int:
        """Bytes of K and V of one token in one sequence (all KV heads)."""
        _, heads, _, kdim = self.keys.shape
        return heads * (kdim + self.values.shape[-1]) * self.keys.element_size()

    def full_nbytes(self) -> int:
        """Bytes a plain transformers cache would hold for the same batch (padding columns included)."""
        if self.keys is None:
            return 0
        held = self.seen if self.sliding_window is None else min(self.seen, self.sliding_window - 1)
        return self.keys.shape[0] * held * self.token_bytes()

    def sequence_bytes(self) -> list[tuple[int, int]]:
        """Per sequence: (bytes its kept tokens fill, bytes full attention holds for its real tokens).

        Kept counts the filled slots of each KV head; full counts its real tokens (for a sliding layer,
        at most the window), so a policy that keeps everything reports exactly 100%, padding or not.
        """
        if self.keys is None:
            return []
        per_head = self.token_bytes() // self.keys.shape[1]
        kept = (self.positions >= 0).sum(dim=(1, 2)) * per_head  # [B]
        real = self.real_tokens()
        if self.sliding_window is not None:
            real = real.clamp(max=self.sliding_window - 1)
        return list(zip(kept.tolist(), (real * self.token_bytes()).tolist(), strict=True))

    def held_entries(self) -> torch.Tensor:
        """``[batch]`` entries (token x KV head) each sequence holds now."""
        return (self.positions >= 0).sum(dim=(1, 2))

    def _track_peak(self) -> None:
        """Fold what each sequence holds now into :attr:`peak` (after a forward's eviction)."""
        held = self.held_entries()
        self.peak = held if self.peak is None else torch.maximum(self.peak, held)

    def peak_bytes(self) -> list[int]:
        """Per sequence: the most bytes its kept tokens filled after any forward (a measurement phase
        included), at least what they fill now."""
        if self.keys is None:
            return []
        held = self.held_entries()
        peak = held if self.peak is None else torch.maximum(self.peak.to(held.device), held)
        return (peak * (self.token_bytes() // self.keys.shape[1])).tolist()

    def real_tokens(self) -> torch.Tensor:
        """``[batch]`` real tokens each sequence has seen (its padding excluded)."""
        padding = self.padding if self.padding is not None else torch.zeros(self.keys.shape[0], dtype=torch.long)
        return self.seen - padding.cpu()

    def kept_tokens(self) -> list[int]:
        """Per sequence, tokens kept (the largest over KV heads)."""
        if self.positions is None:
            return []
        return (self.positions >= 0).sum(-1).amax(-1).tolist()

    def evicted_entries(self) -> int:
        """Entries (token x KV head) evicted so far."""
        return self.evicted
