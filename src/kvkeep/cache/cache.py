"""``KVKeepCache``: a transformers ``Cache`` whose layers physically keep only a budget of tokens.

Every layer starts as a :class:`~kvkeep.cache.compacting.CompactingLayer`, which compresses the prompt.
A static cache swaps each layer after the prompt for a :class:`~kvkeep.cache.slots.SlotLayer` (fixed buffers
overwritten in place; under CO2, first slots for the whole prompt and its ``N`` measurement steps, cut to the
budget after them by the engine's own cut); the cache owns the one :class:`~kvkeep.cache.step.StepState` that a
slot-mode decode step reads, advances it at layer 0 and hands it to every layer.

Every layer takes its shapes and its device from the K/V it receives: under tensor parallelism a rank's
cache holds that rank's KV heads, under a ``device_map`` each layer's cache sits on its layer's device
(:mod:`kvkeep.distributed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from .. import hf
from ..distributed import tensor_parallel
from ..policies import FullPolicy, Policy, make_policy
from ..policies.base import check_count
from ..shapes import AttentionShape
from .compacting import CompactingLayer
from .layer import NO_LIMIT, Observer
from .slots import SlotLayer
from .step import StepState

KERNELS = ("auto", "triton", "torch")
log = logging.getLogger("kvkeep")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for a model on ``device``: ``auto`` is Triton on CUDA when triton is installed."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch"
    import importlib.util
    import os

    installed = importlib.util.find_spec("triton") is not None
    if kernel == "auto":
        return "triton" if device.type == "cuda" and installed else "torch"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":  # the interpreter: tests only
        raise ValueError(
            f"kernel='triton' needs a CUDA device (the model is on {device.type}): use kernel='auto' or 'torch'"
        )
    if not installed:
        raise ValueError("kernel='triton' needs triton: pip install 'kvkeep[gpu]', or use kernel='auto' or 'torch'")
    return "triton"


def hybrid_note(model_type: str, sliding: list[bool], window: int | None, prompt: int, policy: Policy) -> str | None:
    """One line: the share of a ``prompt``-token sequence's KV bytes that ``policy``'s budget governs on a mostly
    sliding hybrid model (``sliding``: per layer) and about how much of them it keeps; None for any other model
    or a policy without a budget.  Every layer of such a model holds the same bytes per token, so shares of
    tokens are shares of bytes; a sliding layer holds ``window - 1`` tokens."""
    governed, slides = sliding.count(False), sliding.count(True)
    if window is None or slides * 2 <= len(sliding) or policy.keeps_all:
        return None
    held_sliding = slides * min(prompt, window - 1)
    share = governed * prompt / (governed * prompt + held_sliding)
    kept = min(prompt, policy.budget_tokens(prompt))
    kept_share = (governed * kept + held_sliding) / (governed * prompt + held_sliding)
    return (
        f"{slides} of {len(sliding)} layers of this {model_type} model slide over a {window}-token window that "
        f"the budget does not shrink; the budget governs the other {governed} layers, {100 * share:.0f}% of the KV "
        f"bytes of a {prompt}-token prompt, so budget {policy.budget} keeps about {100 * kept_share:.0f}% of them"
    )


class KVKeepCache(hf.ReuseGuard, Cache):
    """A KV cache that keeps, per layer and KV head, only the tokens a policy chooses.

    Example::

        cache = KVKeepCache(model, policy="keyformer", budget=0.5, max_new_tokens=128)
        out = model.generate(**inputs, cache=cache, max_new_tokens=128)   # past_key_values= before 5.24
        cache.nbytes(), cache.stats()

    Args:
        model: the transformers causal LM; its forwards that get a kvkeep cache run kvkeep's attention (see
            :func:`kvkeep.hf.install`), the others keep the model's own implementation.
        policy: a name from :data:`kvkeep.POLICIES` or a :class:`~kvkeep.policies.Policy` instance.
        budget: a ratio of the prompt in (0, 1] or an absolute token count (not for ``"full"``).
        static: after the prompt, keep each layer in fixed-capacity slot buffers (``budget + 1`` slots;
            for ``"full"``, prompt + generation length; for CO2's ``N`` measurement steps, prompt + ``N + 1``,
            cut to ``budget + 1`` after them) that new tokens overwrite in place: no per-step copies or host
            synchronisation, so a decode step can run as a CUDA graph.  A hybrid's sliding
            layers hold a ring of their window; a model whose every layer slides is refused in this mode.
        kernel: ``"triton"`` (the fused kernels of :mod:`kvkeep.kernels`), ``"torch"`` (the reference path)
            or ``"auto"`` (Triton on CUDA when triton is installed, torch elsewhere).
        max_new_tokens: tokens the generation will produce, when this cache is driven by ``model.generate``
            (as transformers' ``StaticCache`` takes ``max_cache_len``): Keyformer's temperature schedule and a
            static ``"full"`` cache's capacity need it; :func:`kvkeep.generate` sets it itself.
        observer: ``observer(Eviction)`` after every eviction of the compacting path (the analyses).
        rows: ``(layers, state)``, slot-mode layers and their started step counters to hold instead of a fresh
            prompt's layers (the serving engine's :class:`~kvkeep.cache.rows.RowCache`; ``static`` must be True).
        quiet: no log line about the share of a hybrid model's KV bytes the budget governs (the engine's
            prefills: the server says it once at start-up).
        **params: the policy's parameters (``sinks``, ``recent_ratio``, ``tau_init``, ``alpha``, ...).

    On models that mix sliding-window and global layers (Gemma 3), sliding layers keep their native
    window and the policy applies to the global layers; on models whose every layer slides (Mistral
    v0.1, Phi-3), the policy applies to every layer inside the window.

    A model that transformers split over ranks (tensor parallelism) gets a cache on every rank, each holding
    and evicting its own KV heads; the reports (:meth:`nbytes`, :meth:`stats`, ...) then cover all ranks
    and are collectives that every rank calls.  A model spread over devices (``device_map``) keeps each
    layer's cache on its layer's device.
    """

    routes_to_kvkeep = True  # read by hf.install's forward hook: forwards with this cache run kvkeep's entry

    def __init__(
        self,
        model: torch.nn.Module,
        policy: str | Policy = "full",
        budget: float | int | None = None,
        *,
        static: bool = False,
        kernel: str = "auto",
        max_new_tokens: int | None = None,
        observer: Observer | None = None,
        rows: tuple[list, StepState] | None = None,
        quiet: bool = False,
        **params,
    ):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise ValueError(
                f"the first argument must be the model (a transformers model with a config), got {type(model).__name__}"
            )
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        if max_new_tokens is not None:
            check_count("max_new_tokens", max_new_tokens)
        self.policy = make_policy(policy, budget, **params)
        # Every check before hf.install: a cache that cannot be built leaves the model as it was.
        hf.check_supported(model)
        config = model.config.get_text_config(decoder=True)
        layer_types = hf.layer_types(config)
        hybrid_window, sliding_layers = hf.window_layers(config)
        if static and hf.every_layer_slides(config):
            raise ValueError(
                f"static=True supports sliding-window layers beside global ones (Gemma 2 and 3), not a model whose "
                f"every layer slides ({config.model_type}): use static=False"
            )
        if rows is not None:
            self._check_rows(*rows, len(layer_types))
        self.static = bool(static)
        # Triton only where every layer computes on a GPU (weights offloaded by a device_map sit on "meta").
        devices = [d for d in hf.model_devices(model) if d.type != "meta"] or [torch.device("cpu")]
        self.kernel = resolve_kernel(kernel, next((d for d in devices if d.type != "cuda"), devices[0]))
        self.tp = tensor_parallel(model)
        hf.install(model)
        self.shape = AttentionShape.of(config)
        self.state = StepState(None if max_new_tokens is None else int(max_new_tokens))
        self.model_type = config.model_type
        window = getattr(config, "sliding_window", None)
        if rows is not None:  # the engine's slot rows, already built and their step counters started
            layers, self.state = rows
        else:
            layers = []
            for idx, kind in enumerate(layer_types):
                sliding = window if kind == "sliding_attention" else None
                layer_policy = FullPolicy() if sliding_layers[idx] else self.policy  # a hybrid's sliding layer
                layers.append(CompactingLayer(layer_policy, idx, sliding, self.kernel, observer, self.tp))
        super().__init__(layers=layers)
        #: per layer still in CO2's measurement steps on wide slots: the budget ``[batch]`` it is cut to after them
        self.measuring: dict[int, torch.Tensor] = {}
        self.hybrid_window = hybrid_window
        self._told_hybrid = quiet

    # -- transformers' contract ----------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"this KVKeepCache was built for a model with {len(self.layers)} layers, not this one: build one "
                "with KVKeepCache(model, ...) for the model that uses it"
            )
        if layer_idx > 0 and getattr(self.layers[layer_idx - 1], "awaiting_attention", False):
            raise ValueError(
                f"layer {layer_idx - 1} of this KVKeepCache was updated but its attention did not run through "
                "kvkeep: the model using the cache is not the one it was built for (or its attention was switched "
                "away); build one with KVKeepCache(model, ...) for the model that uses it"
            )
        layer = self.layers[layer_idx]
        if isinstance(layer, CompactingLayer) and not layer.is_initialized:
            self._check_fresh_prompt(layer_idx, key_states)
        elif self.static and isinstance(layer, CompactingLayer):
            layer = self._to_slots(layer_idx)
        elif self._measured(layer_idx):
            layer = self._cut(layer_idx)
        if layer_idx == 0 and layer.decodes_in_place:
            layer.check_step(key_states)
            self.state.advance(self.policy, self._tempered())
        return layer.update(key_states, value_states, self.state)

    def reset(self) -> None:
        """Empty the cache so it can serve a new, unrelated generation."""
        for idx, layer in enumerate(self.layers):
            self.layers[idx] = CompactingLayer(
                layer.policy, idx, layer.sliding_window, self.kernel, layer.observer, self.tp
            )
        self.measuring.clear()
        self.state.reset()

    @staticmethod
    def _check_rows(layers: list, state: StepState, expected: int) -> None:
        if len(layers) != expected:
            raise ValueError(f"the model has {expected} layers, not {len(layers)}")
        if not all(layer.decodes_in_place for layer in layers) or not state.started:
            raise ValueError("rows= takes slot-mode layers and their started step state (the engine's RowCache)")

    # -- the generation's length ---------------------------------------------------------------------
    def set_generation_length(self, max_new_tokens: int) -> None:
        """Tokens the next generation produces (Keyformer's schedule, a static ``full`` cache's capacity)."""
        self.state.max_new_tokens = check_count("max_new_tokens", max_new_tokens)

    def _check_fresh_prompt(self, layer_idx: int, key_states: torch.Tensor) -> None:
        """Checks of a layer's first update: the model's shape, a non-empty prompt, a static ``full`` cache's length."""
        _, kv_heads, columns, head_dim = key_states.shape
        expected_heads, expected_dim = self.shape.kv_heads, self.shape.head_dim
        if self.tp is not None and kv_heads * self.tp.size == expected_heads:  # this rank's share of the heads
            expected_heads = kv_heads
        known = None not in (expected_heads, expected_dim)
        if known and (expected_heads, expected_dim) != (kv_heads, head_dim):
            raise ValueError(
                f"this KVKeepCache was built for a {self.model_type} model with {expected_heads} KV heads of "
                f"dimension {expected_dim}, but layer {layer_idx} of the model using it has {kv_heads} of "
                f"dimension {head_dim}: build one with KVKeepCache(model, ...) for the model that uses it"
            )
        if columns == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if self.static and self.policy.keeps_all and self.state.max_new_tokens is None:
            raise ValueError(
                f"a static cache under '{self.policy.name}' never evicts, so it must know the generation "
                "length: pass max_new_tokens=N to KVKeepCache, or generate with kvkeep.generate"
            )
        if layer_idx == 0 and self.hybrid_window is not None and not self._told_hybrid:
            self._told_hybrid = True
            self._tell_hybrid(columns)

    def _tell_hybrid(self, prompt: int) -> None:
        """Say once, in one line, how much of the KV memory the budget governs on a mostly-sliding hybrid model."""
        sliding = [layer.sliding_window is not None for layer in self.layers]
        note = hybrid_note(self.model_type, sliding, self.hybrid_window, prompt, self.policy)
        if note is not None:
            log.warning("kvkeep: " + note)

    def _tempered(self) -> bool:
        spec = self.policy.score_spec()
        return spec is not None and spec.tempered

    # -- slot mode ------------------------------------------------------------------------------------
    def _to_slots(self, layer_idx: int) -> SlotLayer:
        """Move layer ``layer_idx`` into fixed slot buffers; layer 0 also starts the step counters."""
        layer = self.layers[layer_idx]
        batch = layer.keys.shape[0]
        if layer.sliding_window is not None:  # a hybrid's sliding layer: a ring of its window
            slots = SlotLayer.from_layer(layer, layer.sliding_window, self.kernel, window=layer.sliding_window)
        else:
            slots = self._budget_slots(layer)
        self.layers[layer_idx] = slots
        if layer_idx == 0:
            if self._tempered():  # fails now, in one line, if the schedule has no length
                self.policy.temperature(torch.ones(1, dtype=torch.long), self.state.max_new_tokens)
            self.state.start(layer.newest(), torch.full((batch,), layer.step, device=layer.keys.device))
        return slots

    def _budget_slots(self, layer: CompactingLayer) -> SlotLayer:
        """A layer's slots under its policy: ``budget + 1`` per row, or every token the generation will hold."""
        width = layer.keys.shape[2]
        total = self.state.max_new_tokens
        # Tokens a row will hold at most: the last generated token is never fed back.
        held = None if total is None else width + max(1, total - 1 - layer.step)
        never_evicts = layer.budget is not None and held is not None and int(layer.budget.amin()) >= held
        if layer.budget is None or never_evicts:  # a huge budget: size the slots as for "full"
            capacity = held
        elif int(layer.budget.amax()) >= NO_LIMIT:
            raise ValueError(
                f"a budget of {self.policy.budget} tokens never evicts, so static=True must know the generation "
                "length to size its slots: pass max_new_tokens=N to KVKeepCache, or generate with kvkeep.generate"
            )
        elif layer.step < layer.policy.evict_after():  # CO2's measurement steps
            return self._measuring_slots(layer)
        else:
            capacity = max(width, int(layer.budget.amax()) + 1)
        # never_evicts: nothing to evict, so nothing to score; a full row's check guards a longer generation
        return SlotLayer.from_layer(layer, capacity, self.kernel, evicts=not never_evicts)

    def _measuring_slots(self, layer: CompactingLayer) -> SlotLayer:
        """Slots for CO2's measurement steps: every token ``layer`` holds (the whole prompt) plus one slot per step
        left before the cut and one spare, as the engine's measurement rows; nothing is evicted (a budget beyond
        any row) until :meth:`_cut`, so the steps run the fused decode kernel and replay as a CUDA graph."""
        steps = layer.policy.evict_after() - layer.step
        slots = SlotLayer.from_layer(layer, layer.keys.shape[2] + steps + 1, self.kernel)
        self.measuring[layer.layer_idx] = slots.budget.clone()
        slots.budget.fill_(NO_LIMIT)
        return slots

    def _measured(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has run its measurement steps and waits for its cut."""
        layer = self.layers[layer_idx]
        return layer_idx in self.measuring and layer.step >= layer.policy.evict_after()

    def _cut(self, layer_idx: int) -> SlotLayer:
        """Cut a layer whose measurement steps are over to its budget by the compacting path's own eviction
        (:meth:`SlotLayer.cut_rows`, the engine's cut), into ``budget + 1`` slots per row."""
        wide = self.layers[layer_idx]
        compact = wide.cut_rows(slice(None), self.measuring.pop(layer_idx), wide.seen, wide.step)
        compact.evicted += wide.evicted_entries()
        self.layers[layer_idx] = slots = self._budget_slots(compact)
        return slots

    def end_measurement(self) -> bool:
        """After a decode step: cut every layer whose measurement steps are over (CO2 after its ``N``-th step, where
        the compacting path cuts); True when one was cut, so its buffers changed and a captured decode step no
        longer fits them.  :func:`kvkeep.generate` calls it; otherwise the next step's :meth:`update` cuts."""
        due = [idx for idx in self.measuring if self._measured(idx)]
        for idx in due:
            self._cut(idx)
        return bool(due)

    def ready_for_graph(self) -> bool:
        """True once every layer runs on slot buffers, so a decode step has fixed shapes and addresses."""
        return self.static and all(layer.decodes_in_place for layer in self.layers)

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Around the capture of a decode step as a CUDA graph: the host counters it advances are rolled back."""
        counters = [layer.host_counters() for layer in self.layers]
        try:
            yield
        finally:
            for layer, saved in zip(self.layers, counters, strict=True):
                layer.restore_host_counters(saved)

    def replayed_step(self) -> None:
        """A captured decode step was replayed: advance the host counters its Python did not run."""
        for layer in self.layers:
            layer.replayed_step()

    # -- reporting: over every KV head of the model (under tensor parallelism, collectives over its ranks) --
    def _sum(self, values: list[int]) -> list[int]:
        return values if self.tp is None else self.tp.sum(values)

    def _max(self, values: list[int]) -> list[int]:
        return values if self.tp is None else self.tp.max(values)

    def nbytes(self) -> int:
        """Bytes the K/V tensors hold right now, over all layers (and all ranks)."""
        return self._sum([sum(layer.nbytes() for layer in self.layers)])[0]

    def full_nbytes(self) -> int:
        """Bytes a plain transformers cache would hold for the same batch (padding columns included)."""
        return self._sum([sum(layer.full_nbytes() for layer in self.layers)])[0]

    def sequence_bytes(self) -> list[tuple[int, int]]:
        """Per sequence: (bytes its kept tokens fill, bytes full attention holds for its real tokens)."""
        per_layer = [layer.sequence_bytes() for layer in self.layers if layer.keys is not None]
        rows = [(sum(k for k, _ in row), sum(f for _, f in row)) for row in zip(*per_layer, strict=True)]
        summed = self._sum([n for row in rows for n in row])
        return list(zip(summed[::2], summed[1::2], strict=True))

    def peak_sequence_bytes(self) -> list[int]:
        """Per sequence: the most bytes its kept tokens filled after any forward, summed over layers (every
        policy's layers peak at the same step: the prompt's end, or CO2's cut after its measurement steps)."""
        per_layer = [layer.peak_bytes() for layer in self.layers if layer.keys is not None]
        return self._sum([sum(row) for row in zip(*per_layer, strict=True)])

    def floored(self) -> list[bool]:
        """Per sequence: True when the policy's floor, not its ratio, set the budget (a short prompt)."""
        prompt = self.layers[0].prompt_tokens
        return [] if prompt is None else [self.policy.floored(int(n)) for n in prompt.tolist()]

    def stats(self) -> list[dict]:
        """Per layer: kept tokens (the most over KV heads) and budget per sequence, evicted entries (summed over
        KV heads), bytes."""
        kept_per_layer = [layer.kept_tokens() for layer in self.layers]
        kept = iter(self._max([n for row in kept_per_layer for n in row]))
        summed = iter(self._sum([n for layer in self.layers for n in (layer.evicted_entries(), layer.nbytes())]))
        return [
            {
                "layer": layer.layer_idx,
                "policy": layer.policy.name,
                "kept": [next(kept) for _ in row],
                "budget": None if layer.budget is None else layer.budget.tolist(),
                "evicted": next(summed),
                "sliding_window": layer.sliding_window,
                "seen": layer.seen,
                "bytes": next(summed),
            }
            for layer, row in zip(self.layers, kept_per_layer, strict=True)
        ]
