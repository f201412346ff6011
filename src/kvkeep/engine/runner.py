"""The model side of the engine: a prompt's prefill into its row, and one decode step over every row.

The decode step feeds each row's last token at its own position, lets each row's layers attend, score and
evict, and picks each row's next token with its own sampling settings, all on the device: with CUDA it is
captured once as a CUDA graph and replayed.  Rows without a request run too (shapes are fixed) and their
tokens are ignored; a new request's row is overwritten when it is loaded.
"""

from __future__ import annotations

import torch

from ..cache import KVKeepCache
from ..cache.rows import RowCache
from ..decode import DecodeStep
from ..hf import with_cache
from ..policies import Policy
from ..sampling import Sampling, sample
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
        self.step_logits: torch.Tensor | None = None  # [total rows, vocab]: the last decode step's
        self.prefill_logits: torch.Tensor | None = None  # [vocab]: the last prefill's, for its first token
        cache = self.rows.cache
        self.steps = {  # greedy or not -> the step (every row greedy skips the sampler)
            True: DecodeStep(model, cache, self.tokens, lambda logits: logits.argmax(-1)),
            False: DecodeStep(model, cache, self.tokens, self.sampler),  # no reference back: freed at once
        }
        if device.type == "cuda" if cuda_graph is None else cuda_graph:
            with torch.inference_mode():
                for step in self.steps.values():
                    step.run()  # a first eager step compiles the kernels, while every row is free
                    step.capture()

    # -- a new request --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, row: int, prompt_ids: list[int], sampling: Sampling, max_tokens: int, policy=None,
                prompt_logprobs: int | None = None) -> tuple[int, list | None]:  # fmt: skip
        """Run a prompt alone, compress it into ``row`` (under ``policy``, default the engine's: a request's own
        budget and prompt options); return its first token and, with ``prompt_logprobs=k``, the log-probability
        of each prompt token after the first with the ``k`` likeliest there (see :meth:`logprobs`; else None).

        The prompt runs as a batch of one, so its kept tokens and scores never depend on other requests.  The
        prompt's log-probabilities come from its full attention (compression starts after the prompt).
        """
        cache = KVKeepCache(
            self.model, policy or self.policy, kernel=self.kernel, max_new_tokens=max_tokens, quiet=True
        )
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        keep = 0 if prompt_logprobs is not None else 1  # 0: every position's logits
        every = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **with_cache(self.model, cache)).logits
        logits = every[:, -1]
        scored = None
        if prompt_logprobs is not None:
            scored = _logprobs(every[0, :-1], ids[0, 1:], prompt_logprobs)
        self.prefill_logits = logits[0]
        self.rows.load(row, cache, max_tokens)
        self.sampler.set_row(row, sampling)
        first = self.sampler(logits, slice(row, row + 1), torch.zeros(1, dtype=torch.long, device=self.device))
        self.tokens[row, 0] = first[0]
        return int(first[0]), scored

    def move(self, wide_row: int, row: int) -> None:
        """A CO2 request leaves its measurement row for an ordinary one, cut to its budget."""
        self.rows.cut(wide_row, row)
        self.tokens[row] = self.tokens[wide_row]
        self.sampler.copy_row(wide_row, row)

    def release(self, row: int) -> None:
        self.rows.clear(row)

    # -- the decode step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, greedy: bool = False) -> list[int]:
        """One decode step over every row; the next token of each row (rows without a request: ignore).

        ``greedy``: every row with a request decodes greedily, so the step skips the sampler.
        """
        self.step_logits = self.steps[greedy]()
        return self.tokens[:, 0].tolist()

    @torch.inference_mode()
    def logprobs(self, rows: list[int] | None, tokens: list[int], top: int) -> list[tuple[float, list]]:
        """Per row of ``rows``: the log-probability of its token in ``tokens`` under the last decode step's
        logits (``rows=None``: the first token of the last prefill), and the ``top`` likeliest tokens there with
        theirs (the model's distribution, before temperature and top-p).  One pass over the rows asked."""
        logits = self.prefill_logits[None] if rows is None else self.step_logits[rows]
        return _logprobs(logits, torch.tensor(tokens, device=logits.device), top)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """``logits [n, vocab]``, ``tokens [n]`` -> per position: (log-probability of its token, the ``top`` likeliest
    ``(token, log-probability)`` pairs)."""
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(-1, tokens[:, None].long())[:, 0].tolist()
    if not top:
        return [(lp, []) for lp in chosen]
    best = logprobs.topk(top, -1)
    pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
    return [(lp, list(zip(ids, values, strict=True))) for lp, (ids, values) in zip(chosen, pairs, strict=True)]


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
