"""The engine's cache: every layer's rows, and the moves of a request between them.

Ordinary rows (``capacity`` slots each) come first in the batch; CO2's measurement rows (``wide_capacity``
slots, the whole prompt plus ``N``) follow.  One decode step runs over all of them: each layer is a
:class:`~kvkeep.cache.SlotLayer`, or a :class:`RowGroups` of two when there are measurement rows.  A new
request's compressed prompt is loaded into its row; a CO2 request leaves its measurement row after ``N``
steps, cut to its budget by the compacting layer's own eviction rule, into an ordinary row.
"""

from __future__ import annotations

import torch

from .. import hf
from ..attention import bind
from ..distributed import tensor_parallel
from ..policies import FullPolicy, Policy
from ..shapes import AttentionShape, text_config
from .cache import KVKeepCache
from .layer import NO_LIMIT, KVKeepLayer
from .slots import SlotLayer
from .step import StepState


class RowGroups(KVKeepLayer):
    """One layer over two slot layers of different widths: rows ``[0, narrow)`` and ``[narrow, narrow + wide)``."""

    decodes_in_place = True

    def __init__(self, narrow: SlotLayer, wide: SlotLayer, state: StepState):
        super().__init__(narrow.policy, narrow.layer_idx, narrow.sliding_window, narrow.observer)
        self.narrow, self.wide = narrow, wide
        self.kernel = narrow.kernel
        self.split = narrow.keys.shape[0]
        self.narrow_state = state.view(slice(0, self.split))
        self.wide_state = state.view(slice(self.split, None))
        rows, heads, _, dim = narrow.keys.shape
        total = rows + wide.keys.shape[0]
        self.keys = bind(narrow.keys.new_empty(total, heads, 0, dim), self)  # what the model hands to attention
        self.values = narrow.values.new_empty(total, heads, 0, dim)
        self.positions = torch.cat([narrow.positions[..., :0], wide.positions[..., :0]])

    def part(self, row: int) -> tuple[SlotLayer, int]:
        """The slot layer holding ``row``, and the row's index there."""
        return (self.narrow, row) if row < self.split else (self.wide, row - self.split)

    def check_step(self, key_states: torch.Tensor) -> None:
        self.narrow.check_step(key_states[: self.split])
        self.wide.check_step(key_states[self.split :])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, state: StepState):
        self.narrow.update(key_states[: self.split], value_states[: self.split], self.narrow_state)
        self.wide.update(key_states[self.split :], value_states[self.split :], self.wide_state)
        self.seen, self.step = self.narrow.seen, self.narrow.step
        return self.keys, self.values

    def attend(self, query, attention_mask, scaling, softcap=None, alibi_slopes=None, sink_logits=None):
        narrow = self.narrow.attend(query[: self.split], None, scaling, softcap, alibi_slopes, sink_logits)
        wide = self.wide.attend(query[self.split :], None, scaling, softcap, alibi_slopes, sink_logits)
        return torch.cat([narrow, wide])

    def nbytes(self) -> int:
        return self.narrow.nbytes() + self.wide.nbytes()


class RowCache:
    """The engine's KV cache over fixed rows, and the per-row step counters of its decode step.

    Args:
        model: the model (its forwards with this cache run kvkeep's attention).
        policy: the engine's policy (a request's own budget only changes how much of its row it fills).
        rows, capacity: ordinary rows and their slots per layer and KV head.
        wide_rows, wide_capacity: CO2's measurement rows (0: none).
        kernel: ``"triton"`` or ``"torch"``.
    """

    def __init__(self, model, policy: Policy, rows: int, capacity: int, wide_rows: int, wide_capacity: int, kernel):
        self.policy = policy
        self.rows, self.wide_rows = rows, wide_rows
        shape = AttentionShape.of(model).known()
        tp = tensor_parallel(model)
        param = next(model.parameters())
        kv_heads = shape.kv_heads if tp is None else tp.local_kv_heads()  # this rank's KV heads
        like = torch.empty(1, kv_heads, 1, shape.head_dim, dtype=param.dtype, device=param.device)
        offset = 0 if tp is None else tp.head_offset(kv_heads)  # the model's index of this rank's KV head 0
        self.state = StepState()
        zeros = torch.zeros(rows + wide_rows, dtype=torch.long, device=param.device)
        self.state.start(zeros - 1, zeros)
        window, sliding = hf.window_layers(text_config(model))  # a hybrid's sliding layers: rings of its window
        layers = []
        for idx in range(shape.layers):
            kind = dict(window=window, policy=FullPolicy()) if sliding[idx] else dict(policy=policy)
            narrow = SlotLayer.allocate(
                layer_idx=idx, like=like, rows=rows, capacity=window if sliding[idx] else capacity, kernel=kernel,
                head_offset=offset, **kind,
            )  # fmt: skip
            if wide_rows:
                wide = SlotLayer.allocate(
                    layer_idx=idx, like=like, rows=wide_rows, capacity=window if sliding[idx] else wide_capacity,
                    kernel=kernel, head_offset=offset, **kind,
                )  # fmt: skip
                layers.append(RowGroups(narrow, wide, self.state))
            else:
                layers.append(narrow)
        self.cache = KVKeepCache(model, policy, static=True, kernel=kernel, rows=(layers, self.state))
        self.measured_budget: dict[int, int] = {}  # a measurement row's real budget, applied when it is cut

    @property
    def total_rows(self) -> int:
        return self.rows + self.wide_rows

    def _slots(self, layer, row: int) -> tuple[SlotLayer, int]:
        return layer.part(row) if isinstance(layer, RowGroups) else (layer, row)

    def _parts(self, layer, row: int | None) -> list[tuple[SlotLayer, slice]]:
        """The slot layers of ``layer`` that hold ``row`` (None: every row, in order) and its index there."""
        if row is not None:
            slots, index = self._slots(layer, row)
            return [(slots, slice(index, index + 1))]
        every = [layer.narrow, layer.wide] if isinstance(layer, RowGroups) else [layer]
        return [(part, slice(None)) for part in every]

    def load(self, row: int, prompt: KVKeepCache, length: int) -> None:
        """Put the compressed prompt of a one-sequence cache into ``row``; its next token is its step 1."""
        measuring = row >= self.rows  # a measurement row: nothing is evicted until it is cut (but windows slide)
        if measuring:
            self.measured_budget[row] = next(int(s.budget[0]) for s in prompt.layers if s.budget is not None)
        for layer, source in zip(self.cache.layers, prompt.layers, strict=True):
            slots, index = self._slots(layer, row)
            slots.load_row(index, source, budget=NO_LIMIT if measuring and not slots.is_sliding else None)
        newest = prompt.layers[0].seen - 1
        self.state.set_row(row, newest, 0, length)

    def held_bytes(self, row: int | None = None) -> torch.Tensor:
        """``[rows, 2]`` int64 on the device: per row (``row`` alone: ``[1, 2]``), the bytes of K and V its filled
        slots hold now, over every layer and KV head, and the most they held since the request's prompt (a
        measurement row's before its cut included).  Nothing waits for the device (the engine reads it later)."""
        total = 0
        for layer in self.cache.layers:
            parts = self._parts(layer, row)
            filled = torch.cat([(slots.positions[rows] >= 0).sum((1, 2)) for slots, rows in parts])
            most = torch.maximum(filled, torch.cat([slots.peak[rows] for slots, rows in parts]))
            keys, values = parts[0][0].keys, parts[0][0].values
            per_slot = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
            total = total + torch.stack([filled, most], -1) * per_slot
        return total

    def clear(self, row: int) -> None:
        """Empty ``row`` (its request has finished)."""
        for layer in self.cache.layers:
            slots, index = self._slots(layer, row)
            slots.clear_row(index)

    def cut(self, wide_row: int, row: int) -> None:
        """Move a request from its measurement row into ordinary ``row``, cut to its budget (CO2 after N steps):
        the compacting layer's own eviction over the row's tokens, so it keeps what the compacting path keeps."""
        step = int(self.state.step[wide_row])
        newest = int(self.state.position[wide_row])
        budget = self.measured_budget.pop(wide_row)
        for layer in self.cache.layers:
            wide, index = self._slots(layer, wide_row)
            narrow, target = self._slots(layer, row)
            row_budget = torch.tensor([budget], device=wide.keys.device)
            narrow.load_row(target, wide.cut_rows(slice(index, index + 1), row_budget, newest + 1, step))
            wide.clear_row(index)
        self.state.copy_row(wide_row, row)
