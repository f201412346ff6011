"""The slot layer: fixed-capacity buffers that each new token overwrites in place.

Each row (sequence) has ``capacity`` slots per KV head.  A decode step writes the newcomer into its row's
free slot, attends over the filled slots while adding the step's scores, then empties the row's victim (the
lowest score outside the sinks and the recent window, ties to the newest token, exactly as the compacting
path ranks them) and points the free slot at it.  Shapes and addresses never change and nothing waits on
the host, so a whole decode step can be replayed as a CUDA graph; on CUDA the step runs in Triton kernels
(:mod:`kvkeep.kernels`).  Rows are independent: the engine loads a new request into a freed row.
"""

from __future__ import annotations

import torch

from ..attention import attend, bind
from ..hf import REUSE_HINT
from ..policies import Policy, StepInfo, protected
from .compacting import CompactingLayer
from .layer import NO_LIMIT, KVKeepLayer
from .step import StepState


class SlotLayer(KVKeepLayer):
    """A layer on fixed-capacity slot buffers (see the module docstring).

    Attributes (beyond :class:`~kvkeep.cache.layer.KVKeepLayer`'s):
        free: ``[rows, kv_heads]`` int64 slot the next token of each row is written to.
        kernel: ``"triton"`` (fused kernels) or ``"torch"`` (the reference ops).
    """

    decodes_in_place = True

    def __init__(self, policy: Policy, layer_idx: int, kernel: str = "torch", observer=None, window: int | None = None):
        self.kernel = kernel
        super().__init__(policy, layer_idx, window, observer)

    def clear(self) -> None:
        super().clear()
        self.free = None
        self.state: StepState | None = None
        # (step, kept entries, evicted entries, widest row) when the buffers were filled with one generation's
        # prompts (from_layer); None while rows are loaded and freed one by one (the engine, whose planner sizes
        # every row for its request)
        self.origin: tuple[int, int, int, int] | None = None

    @classmethod
    def allocate(
        cls,
        policy: Policy,
        layer_idx: int,
        like: torch.Tensor,
        rows: int,
        capacity: int,
        kernel: str,
        observer=None,
        head_offset: int = 0,
        evicts: bool = True,
        window: int | None = None,
    ) -> SlotLayer:
        """Empty buffers ``[rows, kv_heads, capacity, head_dim]``, typed and placed like ``like``
        ``[*, kv_heads, *, D]``, whose KV head 0 is the model's head ``head_offset``.  ``evicts=False``: rows
        sized to hold every token they will see, so they keep no budget and no score.  ``window``: a sliding
        layer's ring (``capacity`` = ``window``): each step's oldest token leaves, so ``window - 1`` stay."""
        layer = cls(policy, layer_idx, kernel, observer, window)
        layer.head_offset = head_offset
        if not evicts:
            layer.spec = None
        _, kv_heads, _, head_dim = like.shape
        layer.lazy_initialization(like, like)
        layer.keys = bind(like.new_zeros(rows, kv_heads, capacity, head_dim), layer)
        layer.values = like.new_zeros(rows, kv_heads, capacity, head_dim)
        layer.positions = torch.full((rows, kv_heads, capacity), -1, dtype=torch.long, device=like.device)
        if layer.spec is not None:
            layer.scores = torch.zeros(rows, kv_heads, capacity, dtype=torch.float32, device=like.device)
        layer.free = torch.zeros(rows, kv_heads, dtype=torch.long, device=like.device)
        layer.padding = torch.zeros(rows, dtype=torch.long, device=like.device)
        layer.peak = torch.zeros(rows, dtype=torch.long, device=like.device)
        if window is not None:  # every token held is recent: the victim is always the oldest
            layer.budget = torch.full((rows,), window - 1, dtype=torch.long, device=like.device)
            layer.recent = layer.budget.clone()
        elif evicts and not policy.keeps_all:
            layer.budget = torch.zeros(rows, dtype=torch.long, device=like.device)
            layer.recent = torch.zeros(rows, dtype=torch.long, device=like.device)
        return layer

    @classmethod
    def from_layer(
        cls, source: KVKeepLayer, capacity: int, kernel: str, evicts: bool = True, window: int | None = None
    ) -> SlotLayer:
        """The tokens ``source`` keeps, moved into ``capacity`` slots per row (the rest empty); ``evicts`` and
        ``window``: as :meth:`allocate`'s."""
        batch, _, width, _ = source.keys.shape
        if width > capacity:
            raise ValueError(f"layer {source.layer_idx} keeps {width} tokens, more than the {capacity} slots")
        layer = cls.allocate(
            source.policy, source.layer_idx, source.keys, batch, capacity, kernel, source.observer,
            source.head_offset, evicts, window,
        )  # fmt: skip
        layer.keys[:, :, :width] = source.keys
        layer.values[:, :, :width] = source.values
        layer.positions[:, :, :width] = source.positions
        if layer.scores is not None:
            layer.scores[:, :, :width] = source.scores
        for name in ("budget", "recent", "padding", "peak"):
            if getattr(source, name) is not None and getattr(layer, name) is not None:
                getattr(layer, name).copy_(getattr(source, name))
        layer.prompt_tokens = source.prompt_tokens
        layer.seen, layer.step, layer.evicted = source.seen, source.step, source.evicted
        layer.origin = (source.step, int((layer.positions >= 0).sum()), source.evicted, width)
        layer.free.copy_((layer.positions < 0).to(torch.int8).argmax(-1))
        return layer

    def load_row(self, row: int, source: KVKeepLayer, source_row: int = 0, budget: int | None = None) -> None:
        """Put the tokens ``source`` keeps for its sequence ``source_row`` into ``row`` (a new request);
        ``budget``: the row's budget instead of the source's (a measurement row's: no limit until its cut)."""
        width = source.keys.shape[2]
        if width > self.keys.shape[2]:
            raise ValueError(f"a request keeps {width} tokens in layer {self.layer_idx}, more than its row's slots")
        self.positions[row] = -1
        self.positions[row, :, :width] = source.positions[source_row]
        self.keys[row, :, :width] = source.keys[source_row]
        self.values[row, :, :width] = source.values[source_row]
        if self.scores is not None:
            self.scores[row] = 0.0
            self.scores[row, :, :width] = source.scores[source_row]
        if self.budget is not None and source.budget is not None:
            self.budget[row], self.recent[row] = source.budget[source_row], source.recent[source_row]
            if budget is not None:
                self.budget[row] = budget
        self.peak[row] = (source.positions[source_row] >= 0).sum() if source.peak is None else source.peak[source_row]
        self.free[row] = (self.positions[row] < 0).to(torch.int8).argmax(-1)

    def cut_rows(self, rows: slice, budget: torch.Tensor, seen: int, step: int) -> CompactingLayer:
        """The tokens of ``rows`` (measurement rows, each holding the same tokens in every KV head) as a
        compacting layer at ``step`` after ``seen`` columns, cut to ``budget`` ``[n]`` by the compacting path's own
        eviction rule; its peak is what the rows held before the cut."""
        positions = self.positions[rows]
        held = positions[:, 0] >= 0  # [n, slots]
        # each row's held slots in position order, the empty ones after them
        order = positions[:, 0].masked_fill(~held, NO_LIMIT).argsort(-1)[:, : int(held.sum(-1).amax())]
        index = order[:, None].expand(-1, positions.shape[1], -1)  # [n, kv_heads, width]
        keys = self.keys[rows].gather(2, index[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        values = self.values[rows].gather(2, index[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        compact = CompactingLayer.holding(
            self.policy, self.layer_idx, self.kernel, self.head_offset, keys, values, positions.gather(2, index),
            None if self.scores is None else self.scores[rows].gather(2, index), None if self.is_sliding else budget,
            self.recent[rows], self.padding[rows], seen, step, self.sliding_window,
        )  # fmt: skip
        compact.prompt_tokens = None if self.prompt_tokens is None else self.prompt_tokens[rows]
        compact.evict()
        return compact

    def clear_row(self, row: int) -> None:
        """Empty ``row`` (a finished request's): no slot holds a token."""
        self.positions[row] = -1
        self.peak[row] = 0
        self.free[row] = 0

    # -- transformers' contract ----------------------------------------------------------------------
    def check_step(self, key_states: torch.Tensor) -> None:
        """Raise, before anything moves, unless ``key_states`` is one token per row and a slot is left for it."""
        rows, kv_heads, new, _ = key_states.shape
        if new != 1 or rows != self.keys.shape[0]:
            raise ValueError(
                "a static KVKeepCache takes one token per sequence and step after the prompt (got "
                f"{new} tokens for {rows} sequences, cache holds {self.keys.shape[0]}): {REUSE_HINT}"
            )
        if self.budget is not None or self.origin is None:  # eviction, or rows the engine sized for each request
            return
        start_step, _, _, width = self.origin
        if width + self.step - start_step >= self.keys.shape[2]:
            raise ValueError(
                f"the static cache was sized for {self.keys.shape[2]} tokens per row and is full: "
                "generate no more tokens than the max_new_tokens it was built for"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, state: StepState):
        """Write each row's new token ``[rows, kv_heads, 1, head_dim]`` into its free slot; return the buffers."""
        self.check_step(key_states)
        state = state.to(self.keys.device)
        rows, kv_heads = key_states.shape[:2]
        if self.kernel == "triton":
            from ..kernels.slots import append_slot

            append_slot(self.keys, self.values, self.positions, self.scores, self.free, key_states, value_states,
                        state.position)  # fmt: skip
        else:
            slot = self.free[:, :, None]  # [B, H, 1]
            self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, self.keys.shape[-1]), key_states)
            self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, self.values.shape[-1]), value_states)
            self.positions.scatter_(2, slot, state.position.view(-1, 1, 1).expand(rows, kv_heads, 1))
            if self.scores is not None:
                self.scores.scatter_(2, slot, 0.0)
        self.state = state
        self.seen += 1
        self.step += 1
        return self.keys, self.values

    # -- attention, scoring, eviction ---------------------------------------------------------------
    def attend(self, query, attention_mask, scaling, softcap=None, alibi_slopes=None, sink_logits=None):
        """One decode step over the slots: attention, score update, then one victim per row over budget.

        ``query`` ``[rows, q_heads, 1, head_dim]``, ``sink_logits`` ``[q_heads]`` or None; returns ``[rows, 1,
        q_heads, head_dim]``.
        """
        state = self.state
        if self.kernel == "triton":
            if alibi_slopes is not None:
                raise ValueError(
                    "kvkeep's Triton decode kernel does not support ALiBi: build the cache with kernel='torch'"
                )
            from ..kernels.decode import decode_attention

            out = decode_attention(
                query[:, :, 0], self.keys, self.values, self.positions, scaling, scores=self.scores, spec=self.spec,
                layer_idx=self.layer_idx, head_offset=self.head_offset, tau=state.tau, query_pos=state.position,
                softcap=softcap, sink_logits=sink_logits,
            )[:, None]  # fmt: skip
        else:
            scorer = None
            if self.spec is not None:
                info = StepInfo(
                    self.layer_idx, state.step, state.position[:, None], self.positions, state.length,
                    self.head_offset, sink_logits,
                )  # fmt: skip

                def scorer(logits: torch.Tensor, allowed: torch.Tensor, rows: slice) -> torch.Tensor:
                    return self.policy.step_scores(logits, allowed, info)

            out, step_scores = attend(
                query, self.keys, self.values, self.positions, state.position[:, None], scaling, softcap=softcap,
                alibi_slopes=alibi_slopes, sink_logits=sink_logits, scorer=scorer,
                head_reduce=self.spec.head_reduce if self.spec else "mean",
            )  # fmt: skip
            if step_scores is not None:
                self.scores.copy_(self.policy.accumulate(self.scores, step_scores))
        self.evict(state.position)
        return out

    def evict(self, newest: torch.Tensor) -> None:
        """Per row over budget, empty the lowest-priority unprotected slot; point the free slot at the first
        empty one.  ``newest`` ``[rows]``: each row's newest position.  Ties go to the newest token, as in the
        compacting path's stable ranking of position-ordered slots."""
        if self.kernel == "triton":
            from ..kernels.slots import evict_slot

            return evict_slot(self.positions, self.scores, self.free, newest, budget=self.budget, recent=self.recent,
                              sinks=self.policy.sinks)  # fmt: skip
        positions = self.positions
        if self.budget is not None:
            valid = positions >= 0
            over = valid.sum(-1, keepdim=True) > self.budget[:, None, None]  # [B, H, 1]
            candidate = valid & ~protected(positions, newest, self.recent, self.policy.sinks)
            over = over & candidate.any(-1, keepdim=True)  # nothing to evict when every token is protected
            score = self.scores if self.scores is not None else torch.zeros_like(positions, dtype=torch.float32)
            priority = torch.where(candidate, score, torch.inf)
            lowest = candidate & (priority == priority.amin(-1, keepdim=True))
            victim = torch.where(lowest, positions, -2).argmax(-1, keepdim=True)  # [B, H, 1]
            kept_pos = positions.gather(-1, victim)
            positions.scatter_(-1, victim, torch.where(over, -1, kept_pos))
        self.free.copy_((positions < 0).to(torch.int8).argmax(-1))

    # -- reporting ----------------------------------------------------------------------------------
    def evicted_entries(self) -> int:
        """Entries (token x KV head) evicted so far: every real token since the buffers filled is kept or gone."""
        if self.origin is None:
            raise ValueError("evicted entries are counted over one generation; an engine's rows come and go")
        start_step, start_kept, start_evicted, _ = self.origin
        rows, kv_heads = self.positions.shape[:2]
        kept = int((self.positions >= 0).sum())
        return start_evicted + rows * kv_heads * (self.step - start_step) - (kept - start_kept)
