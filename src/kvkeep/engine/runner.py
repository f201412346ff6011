"""The model side of the engine: a prompt's prefill into its row, and one decode step over every row.

The decode step feeds each row's last token at its own position, lets each row's layers attend, score and
evict, and picks each row's next token with its own sampling settings, all on the device: with CUDA it is
captured once as a CUDA graph and replayed.  Rows without a request run too (shapes are fixed) and their
tokens are ignored; a new request's row is overwritten when it is loaded.

Nothing here waits for the device (but CO2's load into a measurement row and its move, which read counters): a
prefill and a step return their outputs as a :class:`~kvkeep.engine.handoff.Handoff` on its way to the host, so
the engine launches the next step before it reads the last one's tokens. The device's stream keeps the order: a
row is released, loaded or moved only after every step launched before.
"""

from __future__ import annotations

import time

import torch

from ..cache import KVKeepCache
from ..cache.rows import RowCache
from ..decode import DecodeStep
from ..hf import with_cache
from ..policies import Policy
from ..sampling import Sampling, sample
from .handoff import FirstToken, Handoff, Logprobs, StepOutputs
from .planner import Plan


class ModelRunner:
    """Runs ``model`` over the rows of ``plan`` under ``policy``.

    Args:
        cuda_graph: replay the decode step from a CUDA graph (default: on a CUDA device).
    """

    def __init__(self, model, policy: Policy, plan: Plan, kernel: str, cuda_graph: bool | None = None):
        self.model, self.policy, self.plan, self.kernel = model, policy, plan, kernel
        self.rows = RowCache(model, policy, plan.rows, plan.capacity, plan.wide_rows, plan.wide_capacity, kernel)
        device = next(model.parameters()).device
        total = self.rows.total_rows
        self.device = device
        self.tokens = torch.zeros(total, 1, dtype=torch.long, device=device)
        self.sampler = _Sampler(total, device, self.rows.state)
        cache = self.rows.cache
        held = self.rows.held_bytes  # each row's bytes after every step, in its graph (no reference back to self)
        self.steps = {  # greedy or not -> the step (every row greedy skips the sampler)
            True: DecodeStep(model, cache, self.tokens, lambda logits: logits.argmax(-1), after=held),
            False: DecodeStep(model, cache, self.tokens, self.sampler, after=held),  # no reference back: freed at once
        }
        if device.type == "cuda" if cuda_graph is None else cuda_graph:
            with torch.inference_mode(), torch.cuda.device(device):
                for step in self.steps.values():
                    step.run()  # a first eager step compiles the kernels, while every row is free
                    step.capture()

    # -- a new request --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, row: int, prompt_ids: list[int], sampling: Sampling, max_tokens: int, policy=None,
                logprobs: int | None = None, prompt_logprobs: int | None = None) -> Handoff:  # fmt: skip
        """Run a prompt alone and compress it into ``row`` (under ``policy``, default the engine's: a request's own
        budget and prompt options); its first token is on its way to the host (:class:`FirstToken`): with
        ``logprobs=k`` its log-probability and the ``k`` likeliest there, with ``prompt_logprobs=k`` those of each
        prompt token after the first.  Nothing waits for the device, except a CO2 request's load into a
        measurement row, which reads its budget (:meth:`~kvkeep.cache.rows.RowCache.load`).

        The prompt runs as a batch of one, so its kept tokens and scores never depend on other requests.  The
        prompt's log-probabilities come from its full attention (compression starts after the prompt).
        """
        started = self._clock()
        cache = KVKeepCache(
            self.model, policy or self.policy, kernel=self.kernel, max_new_tokens=max_tokens, quiet=True
        )
        ids = _to_device(prompt_ids, self.device)[None]
        keep = 0 if prompt_logprobs is not None else 1  # 0: every position's logits
        every = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **with_cache(self.model, cache)).logits
        logits = every[:, -1]
        self.rows.load(row, cache, max_tokens)
        self.sampler.set_row(row, sampling)
        first = self.sampler(logits, slice(row, row + 1), torch.zeros(1, dtype=torch.long, device=self.device))
        self.tokens[row, 0] = first[0]
        outputs = FirstToken(
            first,
            None if logprobs is None else Logprobs.of(logits, first, logprobs),
            None if prompt_logprobs is None else Logprobs.of(every[0, :-1], ids[0, 1:], prompt_logprobs),
            self.rows.held_bytes(row),
        )
        return Handoff(outputs, started)

    def move(self, wide_row: int, row: int) -> None:
        """A CO2 request leaves its measurement row for an ordinary one, cut to its budget."""
        self.rows.cut(wide_row, row)
        self.tokens[row] = self.tokens[wide_row]
        self.sampler.copy_row(wide_row, row)

    def release(self, row: int) -> None:
        self.rows.clear(row)

    # -- the decode step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, greedy: bool = False, logprobs: int | None = None) -> Handoff:
        """Launch one decode step over every row; its :class:`StepOutputs` are on their way to the host (rows
        without a request: ignore theirs).  Nothing waits for the device: the next step can be launched at once,
        and feeds each row the token this one chose, on the device.

        ``greedy``: every row with a request decodes greedily, so the step skips the sampler.  ``logprobs=k``:
        the chosen tokens' log-probabilities and the ``k`` likeliest, taken before the next step overwrites the
        logits.  Each row's K/V bytes after the step come along (computed inside the step).
        """
        started = self._clock()
        step = self.steps[greedy]
        logits = step()
        tokens = self.tokens[:, 0]
        scored = None if logprobs is None else Logprobs.of(logits, tokens, logprobs)
        outputs = StepOutputs(tokens, step.after_out, scored)  # after_out: the graph's buffer, copied at once
        return Handoff(outputs, started)

    def _clock(self) -> torch.cuda.Event | float:
        """The start of a timed piece of work: an event on the device's stream (CUDA), or the host's clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """``[n]`` int64 on ``device``, through pinned memory on CUDA: a plain copy would wait for the work queued."""
    host = torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class _Sampler:
    """Each row's next token by its own sampling settings (``[rows]`` temperature, top-p and seed on the device)
    and its own step counter (the cache's step state): ``logits [rows, vocab] -> [rows]``."""

    def __init__(self, total: int, device: torch.device, state):
        self.temperature = torch.zeros(total, dtype=torch.float32, device=device)
        self.top_p = torch.ones(total, dtype=torch.float32, device=device)
        self.seed = torch.zeros(total, dtype=torch.long, device=device)
        self.state = state

    def set_row(self, row: int, sampling: Sampling) -> None:
        self.temperature[row], self.top_p[row], self.seed[row] = sampling.temperature, sampling.top_p, sampling.seed

    def copy_row(self, source: int, row: int) -> None:
        for tensor in (self.temperature, self.top_p, self.seed):
            tensor[row] = tensor[source]

    def __call__(self, logits: torch.Tensor, rows: slice = slice(None), step: torch.Tensor | None = None):
        """``step`` ``[1]`` or ``[rows]`` int64 (None: the rows' own counters, advanced inside the forward)."""
        step = self.state.step[rows] if step is None else step
        return sample(logits, self.temperature[rows], self.top_p[rows], self.seed[rows], step)
