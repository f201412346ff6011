"""Greedy decoding with any cache, timed, with the decode step replayed as a CUDA graph when it can be.

``model.generate`` runs every decode step through Python: hundreds of small kernel launches per token,
which on a GPU cost more than the step's arithmetic.  Once a ``KVKeepCache(..., static=True)`` has every
layer in slot mode, a decode step has fixed shapes and addresses and touches no host value, so
:func:`generate` captures one step in a CUDA graph and replays it for the rest of the generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

from .cache import KVKeepCache
from .hf import with_cache


@dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        tokens: ``[batch, max_new_tokens]`` generated token ids.
        prefill_s: seconds of the prompt forward (which also compresses a kvkeep cache).
        step_s: seconds of each of the ``max_new_tokens - 1`` decode steps after it.
        graph_steps: decode steps replayed from a CUDA graph (the last ones).
    """

    tokens: torch.Tensor
    prefill_s: float
    step_s: list[float]
    graph_steps: int

    @property
    def decode_s(self) -> float:
        """Seconds of all decode steps."""
        return sum(self.step_s)


class _Clock:
    """Device events on CUDA (read once at the end), the host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cache: Cache | None = None,
    max_new_tokens: int,
    cuda_graph: bool | None = None,
) -> Generation:
    """Greedy decoding of ``max_new_tokens`` tokens for a (left-padded) batch.

    Args:
        model: a causal LM (for a kvkeep cache, the model the cache was built for).
        input_ids: ``[batch, prompt]``; attention_mask: ``[batch, prompt]`` (1 = token, 0 = left padding).
        cache: a ``KVKeepCache`` or any transformers cache; ``None`` uses a ``DynamicCache``.
        cuda_graph: replay decode steps from a CUDA graph once a static kvkeep cache is in slot mode
            (``None``: whenever that is possible; ``True`` raises where it is not).

    Returns:
        :class:`Generation` with the tokens and the prefill/decode times (device events on CUDA).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cache = DynamicCache(config=model.config) if cache is None else cache
    static = isinstance(cache, KVKeepCache) and cache.static
    if isinstance(cache, KVKeepCache):
        if cache.get_seq_length() > 0:
            raise ValueError("this KVKeepCache already holds an earlier generation: call cache.reset() first")
        cache._total_steps = max_new_tokens
    if cuda_graph and not (static and input_ids.is_cuda):
        raise ValueError("cuda_graph=True needs a KVKeepCache(..., static=True) on a CUDA model")
    use_graph = (static and input_ids.is_cuda) if cuda_graph is None else cuda_graph

    batch, prompt = input_ids.shape
    mask = attention_mask
    position = (mask.sum(-1, keepdim=True) if mask is not None else torch.full((batch, 1), prompt)).to(
        device=input_ids.device, dtype=torch.long
    )
    clock = _Clock(input_ids.device)
    clock.mark()
    prompt_positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=prompt_positions,
        **with_cache(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    token = logits.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
    tokens = [token.clone()]
    clock.mark()
    graph, graph_steps, slot_steps = None, 0, 0
    for _ in range(max_new_tokens - 1):
        if graph is None and use_graph and slot_steps > 0:
            graph, next_token = _capture(model, cache, token, position)
        if graph is not None:
            graph.replay()
            cache._count_replayed_step()
            tokens.append(next_token.clone())
            graph_steps += 1
            clock.mark()
            continue
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
        slot_mode = static and cache.ready_for_graph()  # a slot-mode step ignores the padding mask
        slot_steps += slot_mode
        logits = model(
            input_ids=token,
            position_ids=position,
            attention_mask=None if slot_mode else mask,
            **with_cache(model, cache),
            use_cache=True,
            logits_to_keep=1,
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        position = position + 1
        tokens.append(token.clone())
        clock.mark()
    prefill_s, *step_s = clock.seconds()
    return Generation(torch.cat(tokens, dim=-1), prefill_s, step_s, graph_steps)


def _capture(model, cache: KVKeepCache, token: torch.Tensor, position: torch.Tensor):
    """Capture one decode step that reads ``token``/``position`` and leaves the next ones in place.

    Returns ``(graph, next_token [B, 1])``.  Python-side counters the capture advanced are rolled back;
    :meth:`KVKeepCache._count_replayed_step` advances them after every replay.
    """
    counters = cache._counters()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(
            input_ids=token, position_ids=position, **with_cache(model, cache), use_cache=True, logits_to_keep=1
        )
        next_token = logits.logits[:, -1].argmax(-1, keepdim=True)
        token.copy_(next_token)
        position.add_(1)
    cache._set_counters(counters)
    return graph, next_token
