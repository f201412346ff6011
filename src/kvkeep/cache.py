"""``KVKeepCache``: a transformers ``Cache`` whose layers physically keep only a budget of tokens.

Each layer stores ``keys``/``values`` ``[batch, kv_heads, slots, head_dim]`` plus, per slot, the token's
column in the (left-padded) sequence (``positions``, -1 for an empty slot) and the policy's running
score.  The prompt is compressed layer by layer right after that layer's attention; during decoding the
newcomer enters the recent window and one token per row leaves, so the cache stays at its budget.

With ``static=True`` a layer switches, once the prompt is compressed, to fixed-capacity slot buffers
(``budget + 1`` slots): each new token is written into the slot its row's last victim left, so decode
steps never copy the cache, every tensor keeps its shape and address, and a whole decode step can be
replayed as a CUDA graph (see :func:`kvkeep.generation.generate`).  On CUDA the step's attention and
score update run in one fused Triton kernel (:mod:`kvkeep.kernels`).
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.configuration_utils import GenerationConfig

from .attention import attend, clear_pending, prompt_attention, set_pending
from .policies import FullPolicy, Policy, StepInfo, make_policy

#: Decode-step attention backends of slot mode.
KERNELS = ("auto", "triton", "torch")
_REUSE_HINT = "call cache.reset() or build a new KVKeepCache for each generate call"


class KVKeepLayer(CacheLayerMixin):
    """One decoder layer's cache under a policy (and, for sliding layers, the model's own window).

    Attributes:
        keys, values: ``[batch, kv_heads, slots, head_dim]``.
        positions: ``[batch, kv_heads, slots]`` int64 column of each kept token, -1 for empty slots.
        scores: ``[batch, kv_heads, slots]`` float32 running score (scoring policies only).
        budget: ``[batch]`` int64 tokens each sequence may keep (``None``: no limit).
        padding: ``[batch]`` int64 left-padding length of each sequence.
        seen: columns processed so far (the true sequence length, padding included).
        step: generation step (0 while the prompt is processed).
        slots: True once the layer runs on fixed-capacity slot buffers (``static`` caches).
        free: ``[batch, kv_heads]`` int64 slot the next token is written to (slot mode only).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, policy: Policy, layer_idx: int, sliding_window: int | None, owner: KVKeepCache):
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.owner = owner
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.positions = self.scores = self.budget = self.recent = self.padding = self.prompt_tokens = None
        self.seen = self.step = self.evicted = self._new = 0
        self.is_initialized = False
        self.slots = False
        self.free = None
        self._slot_start = None  # (step, kept entries, evicted entries, slots in use per row) when slot mode began

    def reset(self) -> None:
        self._clear()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- transformers' Cache contract -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, kv_heads, new, head_dim]`` states; return all kept + new states."""
        if self.slots:
            return self._update_slot(key_states, value_states)
        batch, kv_heads, new, _ = key_states.shape
        cols = torch.arange(self.seen, self.seen + new, device=key_states.device).expand(batch, kv_heads, new)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values, self.positions = key_states, value_states, cols
        else:
            if batch != self.keys.shape[0]:
                raise ValueError(
                    f"KVKeepCache holds a batch of {self.keys.shape[0]} sequences but got {batch}: {_REUSE_HINT}"
                )
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, cols], dim=-1)
        if self.policy.needs_scores:
            fresh = torch.zeros(batch, kv_heads, new, dtype=torch.float32, device=key_states.device)
            self.scores = fresh if self.scores is None else torch.cat([self.scores, fresh], dim=-1)
        self._new = new
        self.seen += new
        set_pending(self)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """The true sequence length (every token seen), not the number kept: positions stay true."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a KVKeepCache cannot be cropped (evicted tokens are gone); use a new cache")

    def _index_batch(self, index: torch.Tensor) -> None:
        names = ("keys", "values", "positions", "scores", "budget", "recent", "padding", "prompt_tokens", "free")
        for name in names:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self._index_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    # -- attention, scoring, eviction -----------------------------------------------------------------
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query [batch, q_heads, new, head_dim]`` over the kept tokens; then score and evict.

        Returns ``[batch, new, q_heads, head_dim]``.
        """
        if self.slots:
            self.step += 1
            return self._attend_slots(query, scaling, softcap, alibi_slopes)
        new, first = self._new, self.seen - self._new
        real = self._mark_padding(attention_mask, new)
        if new > 1 or self.prompt_tokens is None:  # prompt phase: the first or a multi-token forward
            self.prompt_tokens = real.sum(-1) + (0 if self.prompt_tokens is None else self.prompt_tokens)
            self._set_budget()
        else:
            self.step += 1
        fused = first == 0 and new > 1 and self.sliding_window is None and softcap is None and alibi_slopes is None
        if fused and self.owner.kernel_for(query) == "triton":
            out, step_scores = self._attend_prompt(query, scaling, real)
        else:
            query_cols = torch.arange(first, self.seen, device=query.device)
            out, step_scores = self._attend_torch(query, query_cols, scaling, softcap, alibi_slopes, real)
        if step_scores is not None:
            self.scores = self.policy.accumulate(self.scores, step_scores)
        self._evict()
        if self.owner.static and self.step >= self.policy.evict_after():
            self._to_slots()
        return out

    def _attend_torch(self, query, query_cols, scaling, softcap, alibi_slopes, real=None):
        """The reference path, :func:`kvkeep.attention.attend` over this layer's slots: ``(output, scores)``."""
        scorer = self._scorer(query_cols) if self.policy.needs_scores else None
        return attend(
            query,
            self.keys,
            self.values,
            self.positions,
            query_cols,
            scaling,
            sliding_window=self.sliding_window,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
            scorer=scorer,
            query_real=real,
            head_reduce=getattr(self.policy, "head_reduce", "mean"),
        )

    def _attend_prompt(self, query: torch.Tensor, scaling: float, real: torch.Tensor):
        """A fresh prompt on the GPU path: output from PyTorch's fused SDPA, scores from a Triton kernel.

        Returns ``(output [B, n, q_heads, D], scores [B, kv_heads, n] or None)``; neither builds an n x n tensor.
        """
        out = prompt_attention(query, self.keys, self.values, self.positions, scaling)
        if not self.policy.needs_scores:
            return out, None
        from .kernels.prefill import prefill_scores

        args = dict(self.policy.kernel_args(self.layer_idx), head_reduce=self.policy.head_reduce)
        args.pop("decay")
        if args["score_mode"] == "gumbel":
            args.update(tau=self.policy.tau(0, None), padding=self.padding)
        return out, prefill_scores(query, self.keys, self.positions, scaling, query_real=real, **args)

    def _mark_padding(self, attention_mask: torch.Tensor | None, new: int) -> torch.Tensor:
        """Turn padding columns of the new tokens into empty slots; return ``[batch, new]`` real flags."""
        batch = self.keys.shape[0]
        if attention_mask is None:
            real = torch.ones(batch, new, dtype=torch.bool, device=self.keys.device)
        else:
            if attention_mask.shape[-1] != self.seen:
                raise ValueError(
                    f"KVKeepCache already holds {self.seen - new} tokens of an earlier generation but the "
                    f"attention mask covers {attention_mask.shape[-1]}: {_REUSE_HINT}"
                )
            real = attention_mask[:, -new:].to(device=self.keys.device, dtype=torch.bool)
            if not bool(real.all()):
                tail = self.positions[..., -new:]
                self.positions = torch.cat(
                    [self.positions[..., :-new], torch.where(real[:, None, :], tail, -1)], dim=-1
                )
        if self.padding is None:
            self.padding = (real.long().cumsum(-1) == 0).sum(-1)
        return real

    def _set_budget(self) -> None:
        """Budget and recent window per sequence, from its real (unpadded) prompt length."""
        if self.policy.keeps_all:
            return
        budgets = []
        for n in self.prompt_tokens.tolist():
            k = self.policy.budget_tokens(n)
            self.policy.check_budget(k, n)
            budgets.append(k)
        device = self.keys.device
        self.budget = torch.tensor(budgets, dtype=torch.long, device=device)
        self.recent = torch.tensor([self.policy.recent_size(k) for k in budgets], dtype=torch.long, device=device)

    def _scorer(self, query_cols: torch.Tensor):
        pad = self.padding.to(query_cols.device)
        key_pos = torch.where(self.positions >= 0, self.positions - pad[:, None, None], -1)
        info = StepInfo(
            layer_idx=self.layer_idx,
            step=self.step,
            query_positions=query_cols[None, :] - pad[:, None],
            key_positions=key_pos,
            total_steps=self.owner.total_steps() if self.step > 0 else None,
        )

        def scorer(logits: torch.Tensor, allowed: torch.Tensor, rows: slice) -> torch.Tensor:
            chunk = StepInfo(info.layer_idx, info.step, info.query_positions[:, rows], key_pos, info.total_steps)
            return self.policy.step_scores(logits, allowed, chunk)

        return scorer

    def _evict(self) -> None:
        """Keep per sequence and KV head the protected tokens and the best-scoring candidates."""
        positions = self.positions
        real = positions >= 0
        if self.sliding_window is not None:  # tokens the next query can no longer see
            real = real & (positions > self.seen - self.sliding_window)
        limited = self.budget is not None and self.step >= self.policy.evict_after()
        n_real = real.sum(-1)  # [B, H]
        n_keep = torch.minimum(n_real, self.budget[:, None]) if limited else n_real
        slots = positions.shape[-1]
        if int(n_keep.amax()) == slots and bool((n_keep == slots).all()):
            return
        if limited:
            from_right = real.flip(-1).cumsum(-1).flip(-1)
            from_left = real.cumsum(-1)
            protected = real & ((from_right <= self.recent[:, None, None]) | (from_left <= self.policy.sinks))
            candidate = self.scores if self.scores is not None else torch.zeros_like(positions, dtype=torch.float32)
            priority = torch.where(protected, torch.inf, torch.where(real, candidate, -torch.inf))
        else:
            priority = torch.where(real, 0.0, -torch.inf)
        order = torch.argsort(priority, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(slots, device=order.device).expand_as(order))
        keep = rank < n_keep[..., None]
        width = int(n_keep.amax())
        slot_ids = torch.arange(slots, device=positions.device)
        index = torch.argsort(torch.where(keep, slot_ids, slot_ids + slots), dim=-1, stable=True)[..., :width]
        kept = keep.gather(-1, index)
        self.evicted += int((positions >= 0).sum() - kept.sum())
        gather_kv = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather_kv)
        self.values = self.values.gather(2, index[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = torch.where(kept, positions.gather(-1, index), -1)
        if self.scores is not None:
            self.scores = torch.where(kept, self.scores.gather(-1, index), 0.0)

    # -- slot mode (static caches): fixed shapes, no copies, no host synchronisation -------------------
    def _to_slots(self) -> None:
        """Move the kept tokens into ``capacity`` slots per row; later tokens overwrite victims in place."""
        batch, kv_heads, width, _ = self.keys.shape
        if self.budget is None:
            total = self.owner.total_steps()
            if total is None:
                raise ValueError(
                    f"a static cache under '{self.policy.name}' never evicts, so it must know the generation "
                    "length: run it inside model.generate(max_new_tokens=N) or kvkeep.generate"
                )
            capacity = width + max(1, total - 1 - self.step)  # the last token is never fed back
        else:
            capacity = max(width, int(self.budget.amax()) + 1)

        def slotted(tensor: torch.Tensor, fill) -> torch.Tensor:
            buffer = tensor.new_full((*tensor.shape[:2], capacity, *tensor.shape[3:]), fill)
            buffer[:, :, :width] = tensor
            return buffer

        kept = int((self.positions >= 0).sum())
        self.keys, self.values = slotted(self.keys, 0), slotted(self.values, 0)
        self.positions = slotted(self.positions, -1)
        if self.scores is not None:
            self.scores = slotted(self.scores, 0.0)
        self.free = (self.positions < 0).to(torch.int8).argmax(-1)
        self._slot_start = (self.step, kept, self.evicted, width)
        self.slots = True
        self.owner._slots_ready(self)

    def _update_slot(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write one new token per row ``[batch, kv_heads, 1, head_dim]`` into its row's free slot."""
        batch, kv_heads, new, head_dim = key_states.shape
        if new != 1 or batch != self.keys.shape[0]:
            raise ValueError(
                f"a static KVKeepCache takes one token per sequence and step after the prompt (got {new} tokens "
                f"for {batch} sequences, cache holds {self.keys.shape[0]}): {_REUSE_HINT}"
            )
        start_step, *_, width = self._slot_start
        if self.budget is None and width + self.step - start_step >= self.keys.shape[2]:
            raise ValueError(
                f"the static cache was sized for {self.keys.shape[2]} tokens per row and is full: "
                "generate no more tokens than the max_new_tokens it was built for"
            )
        if self.layer_idx == 0:
            self.owner._advance()
        if self.owner.kernel_for(key_states) == "triton":
            from .kernels.slots import append_slot

            append_slot(self.keys, self.values, self.positions, self.scores, self.free, key_states, value_states,
                        self.owner.column)  # fmt: skip
        else:
            slot = self.free[:, :, None]  # [B, H, 1]
            self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, head_dim), key_states)
            self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, value_states.shape[-1]), value_states)
            self.positions.scatter_(2, slot, self.owner.column.expand(batch, kv_heads, 1))
            if self.scores is not None:
                self.scores.scatter_(2, slot, 0.0)
        self._new = 1
        self.seen += 1
        set_pending(self)
        return self.keys, self.values

    def _attend_slots(self, query, scaling, softcap, alibi_slopes) -> torch.Tensor:
        """One decode step over the slot buffers: attention, score update, then one victim per row."""
        triton = self.owner.kernel_for(query) == "triton"
        if triton:
            if softcap is not None or alibi_slopes is not None:
                raise ValueError(
                    "kvkeep's Triton decode kernel supports neither logit soft-capping nor ALiBi: "
                    "build the cache with kernel='torch'"
                )
            from .kernels import decode_attention

            args = {}
            if self.scores is not None:
                args = dict(self.policy.kernel_args(self.layer_idx), scores=self.scores)
                args["head_reduce"] = self.policy.head_reduce
                if args["score_mode"] == "gumbel":
                    args.update(tau=self.owner.tau, query_pos=self.owner.query_positions, padding=self.padding)
            out = decode_attention(query[:, :, 0], self.keys, self.values, self.positions, scaling, **args)
            out = out[:, None]
        else:
            out, step_scores = self._attend_torch(query, self.owner.column, scaling, softcap, alibi_slopes)
            if step_scores is not None:
                self.scores.copy_(self.policy.accumulate(self.scores, step_scores))
        self._evict_slot(triton=triton)
        return out

    def _evict_slot(self, triton: bool = False) -> None:
        """Per row over budget, empty the lowest-priority unprotected slot; pick the next free slot.

        Ties go to the newest token, as in :meth:`_evict`'s stable ranking of position-ordered slots.
        ``triton``: the same in one kernel (:func:`kvkeep.kernels.slots.evict_slot`).
        """
        positions = self.positions
        if triton:
            from .kernels.slots import evict_slot

            return evict_slot(positions, self.scores, self.free, self.owner.column, budget=self.budget,
                              recent=self.recent, padding=self.padding, sinks=self.policy.sinks)  # fmt: skip
        if self.budget is not None:
            valid = positions >= 0
            over = valid.sum(-1, keepdim=True) > self.budget[:, None, None]  # [B, H, 1]
            true_pos = positions - self.padding[:, None, None]
            protected = (true_pos < self.policy.sinks) | (positions > self.owner.column - self.recent[:, None, None])
            candidate = valid & ~protected
            score = self.scores if self.scores is not None else torch.zeros_like(positions, dtype=torch.float32)
            priority = torch.where(candidate, score, torch.inf)
            lowest = candidate & (priority == priority.amin(-1, keepdim=True))
            victim = torch.where(lowest, positions, -2).argmax(-1, keepdim=True)  # [B, H, 1]
            kept_pos = positions.gather(-1, victim)
            positions.scatter_(-1, victim, torch.where(over, -1, kept_pos))
        self.free.copy_((positions < 0).to(torch.int8).argmax(-1))

    # -- reporting ------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def full_nbytes(self) -> int:
        """Bytes a plain transformers cache would hold for the same tokens."""
        if self.keys is None:
            return 0
        batch, heads, _, kdim = self.keys.shape
        tokens = self.seen if self.sliding_window is None else min(self.seen, self.sliding_window - 1)
        return batch * heads * tokens * (kdim + self.values.shape[-1]) * self.keys.element_size()

    def evicted_entries(self) -> int:
        """Entries (token x KV head) evicted so far; in slot mode every real token since is kept or evicted."""
        if not self.slots:
            return self.evicted
        start_step, start_kept, start_evicted, _ = self._slot_start
        batch, kv_heads = self.positions.shape[:2]
        kept = int((self.positions >= 0).sum())
        return start_evicted + batch * kv_heads * (self.step - start_step) - (kept - start_kept)

    def kept_tokens(self) -> list[int]:
        """Per sequence, tokens kept (the largest over KV heads)."""
        if self.positions is None:
            return []
        return (self.positions >= 0).sum(-1).amax(-1).tolist()


class KVKeepCache(Cache):
    """A KV cache that keeps, per layer and KV head, only the tokens a policy chooses.

    Example::

        cache = KVKeepCache(model, policy="keyformer", budget=0.5)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=128)
        cache.nbytes(), cache.stats()

    Args:
        model: the transformers causal LM; it is switched to kvkeep's attention (which computes ordinary
            attention for any other cache), through a small adapter for MPT and GPT-J.
        policy: a name from :data:`kvkeep.POLICIES` or a :class:`~kvkeep.policies.Policy` instance.
        budget: a ratio of the prompt in (0, 1] or an absolute token count (not for ``"full"``).
        static: after the prompt, keep each layer in fixed-capacity slot buffers (``budget + 1`` slots;
            for ``"full"``, prompt + generation length) that new tokens overwrite in place: no per-step
            copies or host synchronisation, so a decode step can run as a CUDA graph.  Models with
            sliding-window layers are not supported in this mode.
        kernel: the decode-step attention in slot mode: ``"triton"`` (the fused kernel of
            :mod:`kvkeep.kernels`), ``"torch"`` (the reference path) or ``"auto"`` (Triton on CUDA,
            torch elsewhere).
        **params: the policy's parameters (``sinks``, ``recent_ratio``, ``tau_init``, ``alpha``, ...).

    On models that mix sliding-window and global layers (Gemma 3), sliding layers keep their native
    window and the policy applies to the global layers; on models whose every layer slides (Mistral
    v0.1, Phi-3), the policy applies to every layer inside the window.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: str | Policy = "full",
        budget: float | int | None = None,
        *,
        static: bool = False,
        kernel: str = "auto",
        **params,
    ):
        from .adapters import install

        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.policy = make_policy(policy, budget, **params)
        install(model)
        config = model.config.get_text_config(decoder=True)
        layer_types = _layer_types(config)
        if static and "sliding_attention" in layer_types:
            raise ValueError(
                f"static=True does not support models with sliding-window layers ({config.model_type}): "
                "use static=False"
            )
        self.static, self.kernel = bool(static), kernel
        self.column = self.step_counter = self.tau = self.query_positions = None
        hybrid = "full_attention" in layer_types and "sliding_attention" in layer_types
        window = getattr(config, "sliding_window", None)
        layers = []
        for idx, kind in enumerate(layer_types):
            sliding = window if kind == "sliding_attention" else None
            layer_policy = FullPolicy() if (hybrid and sliding is not None) else self.policy
            layers.append(KVKeepLayer(layer_policy, idx, sliding, self))
        super().__init__(layers=layers)
        self._total_steps: int | None = None

    @property
    def _is_user_defined(self) -> bool:
        return self.__dict__.get("_user_defined", False)

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        # transformers sets this flag at the start of every generate() call that receives this cache
        if value and self.get_seq_length() > 0:
            raise ValueError(
                f"this KVKeepCache already holds {self.get_seq_length()} tokens of an earlier generation: {_REUSE_HINT}"
            )
        self.__dict__["_user_defined"] = value

    def reset(self) -> None:
        """Empty the cache so it can serve a new, unrelated generation."""
        for layer in self.layers:
            layer.reset()
        self._total_steps = None
        self.column = self.step_counter = self.tau = self.query_positions = None
        clear_pending()

    # -- slot mode: the step state every layer reads on the device ---------------------------------------
    def kernel_for(self, query: torch.Tensor) -> str:
        """The decode kernel a slot-mode step on ``query``'s device uses."""
        if self.kernel == "auto":
            return "triton" if query.is_cuda else "torch"
        return self.kernel

    def _slots_ready(self, layer: KVKeepLayer) -> None:
        """The first layer entered slot mode: start the device counters from its state."""
        if layer.layer_idx != 0:
            return
        device = layer.keys.device
        self.column = torch.full((1,), layer.seen - 1, dtype=torch.long, device=device)
        self.step_counter = torch.full((1,), layer.step, dtype=torch.long, device=device)
        self.query_positions = self.column - layer.padding
        self.tau = torch.ones(1, dtype=torch.float32, device=device)

    def _advance(self) -> None:
        """Move the device counters to the next token, in place (so a captured graph replays it)."""
        self.column += 1
        self.step_counter += 1
        torch.sub(self.column, self.layers[0].padding, out=self.query_positions)
        if hasattr(self.policy, "tau_tensor"):
            self.tau.copy_(self.policy.tau_tensor(self.step_counter, self.total_steps()))

    def _counters(self) -> list[tuple[int, int]]:
        return [(layer.seen, layer.step) for layer in self.layers]

    def _set_counters(self, counters: list[tuple[int, int]]) -> None:
        for layer, (seen, step) in zip(self.layers, counters, strict=True):
            layer.seen, layer.step = seen, step

    def _count_replayed_step(self) -> None:
        """A captured decode step was replayed: advance the host-side counters its Python did not run."""
        self._set_counters([(seen + 1, step + 1) for seen, step in self._counters()])

    def ready_for_graph(self) -> bool:
        """True once every layer runs on slot buffers, so a decode step has fixed shapes and addresses."""
        return self.static and all(layer.slots for layer in self.layers)

    def total_steps(self) -> int | None:
        """Tokens the running generation will produce (Keyformer's schedule length), if known."""
        explicit = getattr(self.policy, "max_new_tokens", None)
        if explicit is not None:
            return explicit
        if self._total_steps is None:
            self._total_steps = _generation_length(self.layers[0].seen - self.layers[0].step)
        return self._total_steps

    def nbytes(self) -> int:
        """Bytes the K/V tensors hold right now, over all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes a plain transformers cache would hold for the same tokens."""
        return sum(layer.full_nbytes() for layer in self.layers)

    def stats(self) -> list[dict]:
        """Per layer: kept tokens and budget per sequence, evicted entries (summed over heads), bytes."""
        return [
            {
                "layer": layer.layer_idx,
                "policy": layer.policy.name,
                "kept": layer.kept_tokens(),
                "budget": None if layer.budget is None else layer.budget.tolist(),
                "evicted": layer.evicted_entries(),
                "sliding_window": layer.sliding_window,
                "seen": layer.seen,
                "bytes": layer.nbytes(),
            }
            for layer in self.layers
        ]


def _layer_types(config) -> list[str]:
    """``"full_attention"`` or ``"sliding_attention"`` per decoder layer, as transformers' caches read them."""
    if getattr(config, "num_kv_shared_layers", None):
        raise ValueError("models that share KV caches across layers (Gemma 3n) are not supported by kvkeep")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"]
        elif getattr(config, "sliding_window", None) is not None:
            layer_types = ["sliding_attention"] * config.num_hidden_layers
        else:
            layer_types = ["full_attention"] * config.num_hidden_layers
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported by kvkeep (only full and sliding attention)")
    return list(layer_types)


def _generation_length(prompt_columns: int) -> int | None:
    """The number of tokens the enclosing ``model.generate`` call will produce, or None outside one."""
    frame = inspect.currentframe()
    while frame is not None:
        config = frame.f_locals.get("generation_config")
        if isinstance(config, GenerationConfig):
            if config.max_new_tokens is not None:
                return int(config.max_new_tokens)
            if config.max_length is not None:
                return int(config.max_length) - prompt_columns
        frame = frame.f_back
    return None
