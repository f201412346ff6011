"""What the device hands back to the host, without making the host wait for later work.

The engine launches decode step t+1 before it turns step t's tokens into events (asynchronous scheduling, as
vLLM's).  So a step's outputs are copied into pinned host memory right behind the step on the device's stream,
and an event marks their arrival: reading them waits for that step only, never for the one launched after it.
On a CPU everything has run by the time it is launched, and the copies are plain ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch


class Logprobs(NamedTuple):
    """Log-probabilities of chosen tokens (the model's distribution, before temperature and top-p):
    ``chosen [n]`` float32 each token's, ``top_ids [n, k]`` int64 and ``top_values [n, k]`` float32 the ``k``
    likeliest tokens there and theirs."""

    chosen: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, top: int) -> Logprobs:
        """``logits [n, vocab]``, ``tokens [n]`` on the device; nothing waits for it."""
        logprobs = torch.log_softmax(logits.float(), -1)
        best = logprobs.topk(top, -1)
        return cls(logprobs.gather(-1, tokens[:, None].long())[:, 0], best.indices, best.values)

    def pairs(self, rows: list[int] | None = None) -> list[tuple[float, list[tuple[int, float]]]]:
        """On the host: per position of ``rows`` (default every one), (its token's log-probability, the ``k``
        likeliest ``(token, log-probability)``)."""
        chosen, ids, values = (t if rows is None else t[rows] for t in self)
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        return [(lp, list(zip(i, v, strict=True))) for lp, (i, v) in zip(chosen.tolist(), pairs, strict=True)]


@dataclass
class StepOutputs:
    """A decode step's outputs over every row.

    Attributes:
        tokens: ``[rows]`` int64 each row's next token.
        held: ``[rows, 2]`` int64 each row's K/V bytes after the step, now and at most
            (:meth:`kvkeep.cache.rows.RowCache.held_bytes`).
        logprobs: theirs, when a request asked (:class:`Logprobs` over every row).
    """

    tokens: torch.Tensor
    held: torch.Tensor
    logprobs: Logprobs | None = None


@dataclass
class FirstToken:
    """A prefill's outputs.

    Attributes:
        token: ``[1]`` int64 the request's first token.
        logprobs: its log-probability, when asked (:class:`Logprobs` of one position).
        prompt: the prompt's tokens' after the first, with ``echo`` (:class:`Logprobs` of ``prompt - 1``).
        held: ``[1, 2]`` int64 the row's K/V bytes after its load, now and at most.
    """

    token: torch.Tensor
    logprobs: Logprobs | None = None
    prompt: Logprobs | None = None
    held: torch.Tensor | None = None


def _to_host(value):
    if value is None:
        return None
    if isinstance(value, Logprobs):
        return Logprobs(*(_to_host(t) for t in value))
    return value.to("cpu", non_blocking=True, copy=True)  # from CUDA: into pinned memory, behind the step


class Handoff:
    """Outputs (a :class:`StepOutputs` or :class:`FirstToken` of device tensors) on their way to the host.

    Args:
        outputs: the tensors, just computed (their copies are queued behind them).
        started: when the work began: a timing CUDA event recorded before it, or a ``time.perf_counter()``
            (a CPU runs it before the handoff is made); None: untimed.
    """

    def __init__(self, outputs, started: torch.cuda.Event | float | None = None):
        device = (outputs.token if isinstance(outputs, FirstToken) else outputs.tokens).device
        self.outputs = replace(outputs, **{f.name: _to_host(getattr(outputs, f.name)) for f in fields(outputs)})
        self.started = started
        self.ready: torch.cuda.Event | None = None
        self.wall_ms: float | None = None
        if device.type == "cuda":
            self.ready = torch.cuda.Event(enable_timing=isinstance(started, torch.cuda.Event))
            self.ready.record(torch.cuda.current_stream(device))  # the outputs' device, whatever the thread's
        elif started is not None:
            self.wall_ms = 1e3 * (time.perf_counter() - started)

    def get(self):
        """The outputs on the host, once the device has reached them (waits for that, and nothing later)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.outputs

    def device_ms(self) -> float | None:
        """Milliseconds the device spent from ``started`` to the copies (after :meth:`get`); None: untimed."""
        if isinstance(self.started, torch.cuda.Event):
            return self.started.elapsed_time(self.ready)
        return self.wall_ms
