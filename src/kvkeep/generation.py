"""kvkeep's one decode loop: prefill, then one token per step, timed, replayed as a CUDA graph when it can be.

``model.generate`` runs every decode step through Python: hundreds of small kernel launches per token,
which on a GPU cost more than the step's arithmetic.  Once a ``KVKeepCache(..., static=True)`` has every
layer in slot mode, a decode step has fixed shapes and addresses and touches no host value, so
:func:`generate` captures its step (:class:`kvkeep.decode.DecodeStep`, the serving engine's step too) in a
CUDA graph and replays it for the rest of the generation.

The same loop serves the command line (greedy or sampled), the perplexity task (``forced`` tokens, logits
through ``on_step``) and the analyses (an observer on the cache); :func:`stop_token_ids` and
:func:`until_stop` are the one end-of-sequence rule.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache

from .cache import KVKeepCache
from .decode import DecodeStep
from .hf import model_devices, tp_mesh, with_cache
from .models import context_length
from .policies.base import check_count
from .sampling import GREEDY, Sampling, sample

#: ``on_step(index, logits [B, vocab], tokens [B])`` after each token is chosen (index 0: from the prompt).
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        tokens: ``[batch, steps]`` generated token ids (``steps <= max_new_tokens``: the loop stops once every
            row has produced a stop token).
        lengths: per row, the tokens up to and including its first stop token (all ``steps`` without one).
        prefill_s: seconds of the prompt forward (which also compresses a kvkeep cache).
        step_s: seconds of each decode step after it.
        graph_steps: decode steps replayed from a CUDA graph (the last ones).
    """

    tokens: torch.Tensor
    lengths: list[int]
    prefill_s: float
    step_s: list[float]
    graph_steps: int

    @property
    def decode_s(self) -> float:
        """Seconds of all decode steps."""
        return sum(self.step_s)

    def row(self, index: int) -> list[int]:
        """The tokens of row ``index``, up to and including its stop token."""
        return self.tokens[index, : self.lengths[index]].tolist()


def stop_token_ids(model: torch.nn.Module, tokenizer=None) -> set[int]:
    """The ids that end a sequence: the model's generation config's ``eos_token_id`` and the tokenizer's."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def until_stop(tokens: Iterable[int], stop_ids: set[int]) -> list[int]:
    """``tokens`` up to and including the first stop token."""
    kept = []
    for token in tokens:
        kept.append(token)
        if token in stop_ids:
            break
    return kept


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


class _Chooser:
    """Picks each step's tokens from the logits: greedy, sampled per row, or forced (teacher forcing)."""

    def __init__(self, batch: int, device, sampling, forced: torch.Tensor | None):
        rows = sampling if isinstance(sampling, list) else [sampling or GREEDY] * batch
        if len(rows) != batch:
            raise ValueError(f"sampling has {len(rows)} settings for a batch of {batch}")
        self.greedy = all(s.greedy for s in rows)
        self.temperature = torch.tensor([s.temperature for s in rows], dtype=torch.float32, device=device)
        self.top_p = torch.tensor([s.top_p for s in rows], dtype=torch.float32, device=device)
        self.seed = torch.tensor([s.seed for s in rows], dtype=torch.int64, device=device)
        self.forced = forced

    def __call__(self, logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``logits [B, vocab]``, ``step [1]`` int64 (the index of the token chosen) -> ``[B, 1]``."""
        if self.forced is not None:
            return self.forced.gather(1, step.view(1, 1).expand(self.forced.shape[0], 1))
        if self.greedy:
            return logits.argmax(-1, keepdim=True)
        return sample(logits, self.temperature, self.top_p, self.seed, step.expand(logits.shape[0]))[:, None]


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    cache: Cache | None = None,
    max_new_tokens: int,
    sampling: Sampling | list[Sampling] | None = None,
    stop_ids: Iterable[int] | None = None,
    forced: torch.Tensor | None = None,
    on_step: StepHook | None = None,
    cuda_graph: bool | None = None,
    progress: bool = False,
    beyond_context: bool = False,
) -> Generation:
    """Decode up to ``max_new_tokens`` tokens for a (left-padded) batch.

    Args:
        model: a causal LM (for a kvkeep cache, the model the cache was built for).
        input_ids: ``[batch, prompt]``; attention_mask: ``[batch, prompt]`` (1 = token, 0 = left padding).
        cache: a ``KVKeepCache`` or any transformers cache; ``None`` uses a ``DynamicCache``.
        sampling: greedy (None), one :class:`~kvkeep.sampling.Sampling` for every row, or one per row.
        stop_ids: token ids that end a row (see :func:`stop_token_ids`); the loop stops once every row has
            one.  None: always ``max_new_tokens`` tokens.
        forced: ``[batch, max_new_tokens]`` tokens to feed instead of the model's choice (teacher forcing).
        on_step: ``on_step(index, logits, tokens)`` after each choice.
        cuda_graph: replay decode steps from a CUDA graph once a static kvkeep cache is in slot mode
            (``None``: whenever that is possible; ``True`` raises where it is not).  A model spread over
            several devices (``device_map``) never replays a graph: one graph captures one device's work.  A
            model split over ranks (tensor parallelism) replays none unless asked (``True``): each rank then
            captures its step with the step's collectives (NCCL's graph capture; not yet checked on GPUs).
        progress: show a progress bar of the tokens on stderr.
        beyond_context: run even when the longest prompt plus ``max_new_tokens`` exceeds the model's context
            (its ``max_position_embeddings``); refused otherwise.

    Returns:
        :class:`Generation` with the tokens and the prefill/decode times (device events on CUDA).
    """
    _check_inputs(model, input_ids, attention_mask, max_new_tokens, beyond_context)
    max_new_tokens, batch, device = int(max_new_tokens), input_ids.shape[0], input_ids.device
    if forced is not None and tuple(forced.shape) != (batch, max_new_tokens):
        raise ValueError(f"forced must be [batch, max_new_tokens] = [{batch}, {max_new_tokens}]")
    cache = DynamicCache(config=model.config) if cache is None else cache
    use_graph = _graph_wanted(model, cache, input_ids, cuda_graph)
    if isinstance(cache, KVKeepCache):
        if cache.get_seq_length() > 0:
            raise ValueError("this KVKeepCache already holds an earlier generation: call cache.reset() first")
        cache.set_generation_length(max_new_tokens)
    chooser = _Chooser(batch, device, sampling, None if forced is None else forced.to(device))
    stops = torch.tensor(sorted(set(stop_ids or ())), dtype=torch.long, device=device)
    clock = _Clock(device)
    clock.mark()
    logits = _prefill(model, cache, input_ids, attention_mask)
    counter = torch.zeros(1, dtype=torch.long, device=device)  # the index of the token being chosen
    tokens = [chooser(logits, counter)]
    clock.mark()
    if on_step is not None:
        on_step(0, logits, tokens[0][:, 0])

    def choose(logits: torch.Tensor) -> torch.Tensor:
        counter.add_(1)
        return chooser(logits, counter)[:, 0]

    prompt = input_ids.shape[1]
    fed = attention_mask.sum(-1, keepdim=True) if attention_mask is not None else torch.full((batch, 1), prompt)
    step = DecodeStep(model, cache, tokens[0].clone(), choose, positions=fed.to(device).long())
    loop = _Loop(step, attention_mask, stops, use_graph, clock, on_step)
    from tqdm import tqdm

    with tqdm(total=max_new_tokens, initial=1, unit="tok", disable=not progress, file=sys.stderr, leave=False) as bar:
        loop.run(tokens, max_new_tokens, bar)
    prefill_s, *step_s = clock.seconds()
    out = torch.cat(tokens, dim=-1)
    stopped = torch.isin(out, stops)
    first = torch.where(stopped.any(-1), stopped.int().argmax(-1) + 1, out.shape[1])
    return Generation(out, first.tolist(), prefill_s, step_s, loop.graph_steps)


class _Loop:
    """The decode steps after the prompt: until ``max_new_tokens`` or every row has stopped, capturing the step
    as a CUDA graph once the cache allows it (``use_graph``)."""

    def __init__(self, step: DecodeStep, mask, stops: torch.Tensor, use_graph: bool, clock: _Clock, on_step):
        self.step, self.mask, self.stops, self.use_graph = step, mask, stops, use_graph
        self.clock, self.on_step = clock, on_step
        self.graph_steps = 0

    def run(self, tokens: list[torch.Tensor], max_new_tokens: int, bar) -> None:
        """Append each step's ``[batch, 1]`` tokens to ``tokens`` (which holds the prompt's choice)."""
        step, cache = self.step, self.step.cache
        kvkeep_cache = isinstance(cache, KVKeepCache)
        finished = torch.isin(tokens[0][:, 0], self.stops)
        for index in range(1, max_new_tokens):
            if self.stops.numel() and bool(finished.all()):
                break
            if step.graph is None and self.use_graph and cache.ready_for_graph():
                step.capture()
            if self.mask is not None and step.graph is None:
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=-1)
            slot_mode = kvkeep_cache and cache.ready_for_graph()  # a slot-mode step ignores the padding mask
            self.graph_steps += step.graph is not None
            logits = step(None if slot_mode else self.mask)
            if kvkeep_cache and cache.end_measurement():  # CO2's cut replaced the buffers the graph replays
                step.release()
            tokens.append(step.tokens.clone())
            self.clock.mark()
            if self.on_step is not None:
                self.on_step(index, logits, tokens[-1][:, 0])
            finished |= torch.isin(tokens[-1][:, 0], self.stops)
            bar.update()


def _graph_wanted(model, cache, input_ids: torch.Tensor, cuda_graph: bool | None) -> bool:
    """Whether to replay decode steps from a CUDA graph (``cuda_graph`` None: whenever it can); a one-line
    ``ValueError`` when ``cuda_graph=True`` cannot be honoured."""
    static = isinstance(cache, KVKeepCache) and cache.static
    devices = model_devices(model)
    if cuda_graph and len(devices) > 1:
        raise ValueError(
            f"cuda_graph=True needs the model on one device, but its layers sit on {', '.join(map(str, devices))} "
            "(device_map): pass cuda_graph=False"
        )
    if cuda_graph and not (static and input_ids.is_cuda):
        raise ValueError("cuda_graph=True needs a KVKeepCache(..., static=True) on a CUDA model")
    graphable = static and input_ids.is_cuda and len(devices) == 1 and tp_mesh(model) is None
    return graphable if cuda_graph is None else cuda_graph


def _prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The prompt's forward (which compresses a kvkeep cache); the last position's logits ``[batch, vocab]``."""
    positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
        logits_to_keep=1, **with_cache(model, cache),
    ).logits[:, -1]  # fmt: skip


def _check_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    beyond_context: bool = False,
) -> None:
    """The entry checks of :func:`generate`: a one-line ``ValueError`` naming the fix, before any forward."""
    check_count("max_new_tokens", max_new_tokens)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt], got shape {list(input_ids.shape)}: add a batch dimension")
    if 0 in input_ids.shape:
        raise ValueError(f"the prompt is empty: give at least one token (input_ids {list(input_ids.shape)})")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}"
            )
        lengths = attention_mask.sum(-1).tolist()  # one host read for both checks
        if min(lengths) <= 0:
            raise ValueError(
                "a prompt of the batch is empty (its attention mask is all zeros): give at least one token"
            )
    longest = input_ids.shape[1] if attention_mask is None else int(max(lengths))
    context = context_length(model.config)
    if context and longest + max_new_tokens > context and not beyond_context:
        raise ValueError(
            f"the prompt has {longest} tokens and max_new_tokens asks {max_new_tokens} more, beyond the "
            f"{context}-token context of this {model.config.model_type} model: shorten the prompt or lower "
            "max_new_tokens (or pass beyond_context=True to run past it anyway)"
        )
