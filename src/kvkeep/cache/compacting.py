"""The compacting layer: it holds exactly the tokens it keeps, in position order.

Each forward appends the newcomers, attends over everything held, adds the step's scores and gathers the
kept tokens into fresh, smaller tensors, so the bytes held always equal the tokens kept.  Every prompt is
compressed this way (layer by layer, right after that layer's attention, so only one layer is ever held at
full size); the reference decode path keeps decoding this way too.
"""

from __future__ import annotations

import torch

from ..attention import attend, bind, causal_attention_lse, plain_attention, real_counts
from ..hf import REUSE_HINT
from ..policies import StepInfo, protected, reduce_heads
from ..policies.base import pool_scores
from .layer import Eviction, KVKeepLayer
from .step import StepState


class CompactingLayer(KVKeepLayer):
    """A layer whose tensors shrink to the kept tokens after every forward (see the module docstring).

    Attributes (beyond :class:`~kvkeep.cache.layer.KVKeepLayer`'s):
        kernel: ``"triton"`` scores a fresh prompt with the Triton prefill kernel, ``"torch"`` with :func:`attend`.
    """

    def __init__(self, policy, layer_idx, sliding_window, kernel: str = "torch", observer=None, tp=None):
        self.kernel = kernel
        super().__init__(policy, layer_idx, sliding_window, observer, tp)

    @classmethod
    def holding(cls, policy, layer_idx: int, kernel: str, head_offset: int, keys, values, positions, scores,
                budget: torch.Tensor | None, recent: torch.Tensor, padding: torch.Tensor, seen: int, step: int,
                sliding_window: int | None = None) -> CompactingLayer:  # fmt: skip
        """A layer over tokens already held (measurement rows', in position order), at generation ``step`` after
        ``seen`` columns (each row's newest token at ``seen - 1 - padding``), to evict down to ``budget`` (None: no
        limit but the ``sliding_window``): keys, values ``[n, kv_heads, slots, head_dim]``, positions ``[n,
        kv_heads, slots]`` int64 (-1: empty), scores ``[n, kv_heads, slots]`` or None, budget, recent, padding
        ``[n]`` int64.  Its peak is what it holds now."""
        layer = cls(policy, layer_idx, sliding_window, kernel)
        layer.lazy_initialization(keys, values)
        layer.head_offset = head_offset
        layer.keys, layer.values, layer.positions, layer.scores = keys, values, positions, scores
        layer.budget, layer.recent, layer.padding = budget, recent, padding
        layer.seen, layer.step = seen, step
        layer._track_peak()
        return layer

    def clear(self) -> None:
        super().clear()
        self.new_tokens = 0
        self.state: StepState | None = None
        self.awaiting_attention = False

    # -- transformers' contract ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, state: StepState | None = None):
        """Append ``[batch, kv_heads, new, head_dim]`` states; return everything held, the newcomers last."""
        if self.awaiting_attention:
            raise RuntimeError(
                "a KVKeepCache layer was updated but its attention never ran through kvkeep: build the cache "
                "with KVKeepCache(model, ...) for the model that uses it, and do not switch its attention away; "
                f"{REUSE_HINT}"
            )
        batch, kv_heads, new, _ = key_states.shape
        if self.is_initialized and (batch, kv_heads) != tuple(self.keys.shape[:2]):
            raise ValueError(
                f"KVKeepCache holds {self.keys.shape[0]} sequences x {self.keys.shape[1]} KV heads but got {batch} x "
                f"{kv_heads}: {REUSE_HINT}"
            )
        columns = torch.arange(self.seen, self.seen + new, device=key_states.device)[None, :]
        if self.padding is not None:  # (the first forward's: _mark_padding shifts them once it knows the padding)
            columns = columns - self.padding.to(columns.device)[:, None]
        positions = columns[:, None].expand(batch, kv_heads, new)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values, self.positions = key_states, value_states, positions
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, positions], dim=-1)
        if self.spec is not None:
            fresh = torch.zeros(batch, kv_heads, new, dtype=torch.float32, device=key_states.device)
            self.scores = fresh if self.scores is None else torch.cat([self.scores, fresh], dim=-1)
        self.new_tokens, self.state = new, state
        self.seen += new
        self.awaiting_attention = True
        bind(self.keys, self)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self._index_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def _index_batch(self, index: torch.Tensor) -> None:
        for name in ("keys", "values", "positions", "scores", "budget", "recent", "padding", "prompt_tokens", "peak"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        if self.keys is not None:
            bind(self.keys, self)

    # -- attention, scoring, eviction ---------------------------------------------------------------
    def attend(self, query, attention_mask, scaling, softcap=None, alibi_slopes=None, sink_logits=None):
        """Attention of ``query [batch, q_heads, new, head_dim]`` over the held tokens; then score and evict.

        ``sink_logits``: ``[q_heads]`` learned sinks (:func:`kvkeep.attention.attend`).  Returns ``[batch, new,
        q_heads, head_dim]``.
        """
        self.awaiting_attention = False
        new, first = self.new_tokens, self.seen - self.new_tokens
        counts = real_counts(attention_mask, new, self.keys.shape[0])  # host: no wait on the device per layer
        real = self._mark_padding(attention_mask, new, counts)
        prompt = new > 1 or self.prompt_tokens is None  # prompt phase: the first or a multi-token forward
        budgets = None
        if prompt:
            self.prompt_tokens = torch.tensor(counts) + (0 if self.prompt_tokens is None else self.prompt_tokens)
            budgets = self.set_budgets(self.prompt_tokens.tolist(), self.keys.device)
        else:
            self.step += 1
        columns = torch.arange(first, self.seen, device=query.device)
        query_positions = torch.where(real, columns[None, :] - self.padding.to(query.device)[:, None], -1)
        fresh = first == 0 and new > 1 and self.sliding_window is None and softcap is None and alibi_slopes is None
        # The observation window: at a prompt, its last `observe` rows (the same columns for every sequence of a
        # left-padded batch, so each sequence's own last tokens) score apart from the rest.
        window = None
        if prompt and self.spec is not None and self.spec.observe:
            window = max(0, new - self.spec.observe)
        if fresh and self.kernel == "triton":
            dense = min(counts) == new  # no padding: every key real
            out, scores, window_scores = self._attend_prompt_fused(
                query, query_positions, scaling, real, window, dense, sink_logits
            )
        else:
            out, scores, window_scores = self._attend_torch(
                query, query_positions, scaling, softcap, alibi_slopes, window, sink_logits
            )
        if window_scores is not None:
            scores = self._blend(scores, window_scores, real, window)
        if scores is not None:
            self.scores = self.policy.accumulate(self.scores, scores)
        # a fresh prompt's layer holds every real token in every KV head: what eviction keeps is known on the host
        self.evict(counts if first == 0 and self.sliding_window is None else None, budgets)
        self._track_peak()
        return out

    def _blend(self, every: torch.Tensor | None, window: torch.Tensor, real: torch.Tensor, first: int) -> torch.Tensor:
        """A prompt's score from the window's (pooled) and, unless the policy scores by the window alone, every
        row's: ``every + (n / w) * pool(window)``, with ``n`` and ``w`` each sequence's real rows in the forward
        and in the window, so both parts weigh the same.  Shapes ``[B, kv_heads, slots]``; ``real`` ``[B, new]``."""
        pooled = pool_scores(window, self.spec.pool, self.positions >= 0)
        if every is None:
            return pooled
        rows, in_window = real.sum(-1), real[:, first:].sum(-1).clamp(min=1)
        return every + (rows / in_window).to(pooled.dtype)[:, None, None] * pooled

    def _attend_torch(self, query, query_positions, scaling, softcap, alibi_slopes, window=None, sink_logits=None):
        """The reference path, :func:`kvkeep.attention.attend` over the held tokens.

        Returns ``(output, scores, window_scores)``: ``window`` (None: no observation window) is the index of
        this forward's first window row; ``window_scores`` sums the rows from there on, ``scores`` every row (None
        when the policy scores by the window alone: then the rows before the window are not scored at all).
        """
        scorer, window_sum = None, None
        every = window is None or self.spec.every_query
        if self.spec is not None:
            total = self.state.max_new_tokens if self.state is not None else None
            first = 0 if every else window  # the first row whose scores attend() sums
            if every and window is not None:  # the window's part of every row's sum, kept apart
                batch, kv_heads, slots = self.positions.shape
                window_sum = query.new_zeros(batch, kv_heads, query.shape[1] // kv_heads, slots, dtype=torch.float32)

            def scorer(logits: torch.Tensor, allowed: torch.Tensor, rows: slice) -> torch.Tensor:
                skip = min(max(0, first - rows.start), rows.stop - rows.start)
                rows = slice(rows.start + skip, rows.stop)
                chunk = StepInfo(
                    self.layer_idx, self.step, query_positions[:, rows], self.positions, total, self.head_offset,
                    sink_logits,
                )  # fmt: skip
                part = self.policy.step_scores(logits[:, :, :, skip:], allowed[:, :, :, skip:], chunk)
                if window_sum is not None:
                    window_sum.add_(part[:, :, :, max(0, window - rows.start) :].sum(dim=3))
                return part

        head_reduce = self.spec.head_reduce if self.spec is not None else "mean"
        out, scores = attend(
            query,
            self.keys,
            self.values,
            self.positions,
            query_positions,
            scaling,
            sliding_window=self.sliding_window,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            sink_logits=sink_logits,
            scorer=scorer,
            head_reduce=head_reduce,
        )
        if window is None:
            return out, scores, None
        if not every:
            return out, None, scores
        return out, scores, reduce_heads(window_sum, head_reduce)

    def _attend_prompt_fused(self, query, query_positions, scaling: float, real: torch.Tensor, window: int | None,
                             dense: bool, sink_logits: torch.Tensor | None = None):  # fmt: skip
        """A fresh prompt on the GPU: output from PyTorch's fused SDPA (without padding, for a ``probs`` score or a
        learned sink, the flash kernel's, whose row log-sum-exp spares the prefill kernel its first pass and gives
        the sink's share), scores from the Triton kernel.

        Returns ``(output [B, n, q_heads, D], scores, window_scores)`` as :meth:`_attend_torch` (``[B, kv_heads,
        n]`` or None); the window's pass reads only its rows, and nothing builds an n x n tensor.  ``dense``: the
        prompt has no padding (known on the host).  SDPA knows no learned sink: each row's output is scaled by its
        share of the mass on real keys, ``sigmoid(lse - sink)``.
        """
        from ..kernels.prefill import prefill_scores, prompt_lse

        # Without padding the flash kernel gives each row's log-sum-exp with the output: it spares a probability
        # score its first pass and is what a learned sink's share needs (a tempered score keeps its own pass).
        probs = self.spec is not None and not self.spec.tempered
        fused = None
        if dense and (probs or sink_logits is not None):
            fused = causal_attention_lse(query, self.keys, self.values, scaling)
        if fused is not None:
            out, lse = fused
        else:  # a fresh prompt holds the same tokens in every KV head: one mask serves them all
            out, lse = plain_attention(
                query, self.keys, self.values, self.positions[:, :1], query_positions, scaling, dense=dense
            ), None
        padding = self.padding.to(query.device)
        columns = torch.where(self.positions >= 0, self.positions + padding[:, None, None], -1)
        if sink_logits is not None:
            if lse is None:
                lse = prompt_lse(query, self.keys, columns, scaling, query_real=real)  # [B, q_heads, n]
            share = torch.sigmoid(lse - sink_logits.float().view(1, -1, 1)).transpose(1, 2)[..., None]
            out = (out * share).to(out.dtype)
        lse = lse if probs else None
        if self.spec is None:
            return out, None, None
        tau = float(self.policy.temperature(torch.zeros(1, dtype=torch.long), None))

        def scores_from(first_row: int) -> torch.Tensor:
            return prefill_scores(
                query, self.keys, columns, scaling, spec=self.spec, layer_idx=self.layer_idx,
                head_offset=self.head_offset, tau=tau, query_real=real, padding=padding, first_row=first_row, lse=lse,
                sink_logits=sink_logits,
            )  # fmt: skip

        every = scores_from(0) if window is None or self.spec.every_query else None
        return out, every, None if window is None else scores_from(window)

    def _mark_padding(self, attention_mask: torch.Tensor | None, new: int, counts: list[int]) -> torch.Tensor:
        """Turn padding columns of the new tokens into empty slots; return ``[batch, new]`` real flags (``counts``:
        the real ones per sequence, on the host)."""
        batch = self.keys.shape[0]
        if attention_mask is None:
            real = torch.ones(batch, new, dtype=torch.bool, device=self.keys.device)
        else:
            if attention_mask.shape[-1] != self.seen:
                raise ValueError(
                    f"KVKeepCache already holds {self.seen - new} tokens of an earlier generation but the "
                    f"attention mask covers {attention_mask.shape[-1]}: {REUSE_HINT}"
                )
            real = attention_mask[:, -new:].to(device=self.keys.device, dtype=torch.bool)
        if self.padding is None:
            self.padding = (real.long().cumsum(-1) == 0).sum(-1)
            tail = self.positions[..., -new:] - self.padding[:, None, None]
            self.positions = torch.cat([self.positions[..., :-new], tail], dim=-1)
        if min(counts) < new:
            tail = torch.where(real[:, None, :], self.positions[..., -new:], -1)
            self.positions = torch.cat([self.positions[..., :-new], tail], dim=-1)
        return real

    def newest(self) -> torch.Tensor:
        """``[batch]`` position of each sequence's newest token."""
        return self.seen - 1 - self.padding.to(self.positions.device)

    def evict(self, held: list[int] | None = None, budgets: list[int] | None = None) -> None:
        """Keep per sequence and KV head the protected tokens and the best-scoring candidates; gather them.

        ``held``: per sequence, the real tokens every KV head holds, when the caller knows it on the host (a fresh
        prompt), with ``budgets`` (None: no limit); then nothing here waits for the device.
        """
        positions = self.positions
        newest = self.newest()
        real = positions >= 0
        if self.sliding_window is not None:  # tokens the next query can no longer see
            real = real & (positions > (newest - self.sliding_window + 1)[:, None, None])
        limited = self.budget is not None and self.step >= self.policy.evict_after()
        n_real = real.sum(-1)  # [B, H]
        n_keep = torch.minimum(n_real, self.budget[:, None]) if limited else n_real
        slots = positions.shape[-1]
        guard = torch.zeros_like(real)
        if self.recent is not None:
            guard = protected(positions, newest, self.recent, self.policy.sinks) & real
        fewest, width, evicted = self._keep_counts(n_keep, held, budgets if limited else None)
        if fewest == slots:
            self._observe(positions, real & ~guard, positions, 0)
            return
        if limited:
            candidate = self.scores if self.scores is not None else torch.zeros_like(positions, dtype=torch.float32)
            priority = torch.where(guard, torch.inf, torch.where(real, candidate, -torch.inf))
        else:
            priority = torch.where(real, 0.0, -torch.inf)
        # Stable ranking of position-ordered slots: among equal priorities the oldest stays, the newest goes.
        order = torch.argsort(priority, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(slots, device=order.device).expand_as(order))
        keep = rank < n_keep[..., None]
        slot_ids = torch.arange(slots, device=positions.device)
        index = torch.argsort(torch.where(keep, slot_ids, slot_ids + slots), dim=-1, stable=True)[..., :width]
        kept = keep.gather(-1, index)
        if evicted is None:
            evicted = int((positions >= 0).sum() - kept.sum())
        self.evicted += evicted
        self.keys = bind(self.keys.gather(2, index[..., None].expand(-1, -1, -1, self.keys.shape[-1])), self)
        self.values = self.values.gather(2, index[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = torch.where(kept, positions.gather(-1, index), -1)
        before_scores = self.scores
        if self.scores is not None:
            self.scores = torch.where(kept, self.scores.gather(-1, index), 0.0)
        self._observe(positions, real & ~guard, self.positions, evicted, before_scores)

    def _keep_counts(self, n_keep: torch.Tensor, held: list[int] | None, budgets: list[int] | None):
        """``(fewest kept, most kept, entries evicted)`` over the ``[B, kv_heads]`` counts ``n_keep``: from the host's
        ``held`` and ``budgets`` (see :meth:`evict`) without a device sync, else read from ``n_keep`` (the evicted
        entries then None: counted after the gather)."""
        if held is None:
            return int(n_keep.amin()), int(n_keep.amax()), None
        keep = held if budgets is None else [min(n, k) for n, k in zip(held, budgets, strict=True)]
        heads = self.positions.shape[1]
        return min(keep), max(keep), heads * (sum(held) - sum(keep))

    def _observe(self, before, candidates, after, evicted, scores=None) -> None:
        if self.observer is None:
            return
        scores = self.scores if scores is None else scores
        first_scores = None if scores is None else scores[0].clone()
        event = Eviction(
            self.layer_idx, self.step, self.policy.name, before[0].clone(), first_scores, candidates[0].clone(),
            after[0].clone(), evicted,
        )  # fmt: skip
        self.observer(event)
