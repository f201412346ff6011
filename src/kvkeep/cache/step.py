"""The counters of a decode step, per row, on the device: one object the cache hands to its layers.

A slot-mode decode step must run without the host (so it can be replayed as a CUDA graph) while rows
sit at different positions and steps of their own generation (continuous batching).  Everything a step
reads about where each row stands lives here, as ``[rows]`` tensors advanced in place.
"""

from __future__ import annotations

import torch

from ..policies import Policy


class StepState:
    """Where each row of a batch stands in its generation.

    Attributes:
        max_new_tokens: tokens the running generation produces, on the host (None: unknown); the
            compacting path reads it for a tempered score's schedule.
        position: ``[rows]`` int64 true position of the token each row feeds this step.
        step: ``[rows]`` int64 generation step of that token (1 = the first generated token fed back).
        length: ``[rows]`` int64 tokens each row generates (the temperature schedule's length; 0 unknown).
        tau: ``[rows]`` float32 the policy's temperature at ``step`` (tempered scores only).

    The tensors are None until :meth:`start`; :meth:`advance` moves every row to its next token in place.
    """

    def __init__(self, max_new_tokens: int | None = None):
        self.max_new_tokens = max_new_tokens
        self.position = self.step = self.length = self.tau = None

    @property
    def started(self) -> bool:
        return self.position is not None

    def start(self, position: torch.Tensor, step: torch.Tensor, length: torch.Tensor | None = None) -> None:
        """Allocate the device counters at the last token processed: ``position``/``step`` ``[rows]`` int64."""
        self.position = position.to(torch.int64).clone()
        self.step = step.to(torch.int64).clone()
        default = self.max_new_tokens or 0
        self.length = torch.full_like(self.step, default) if length is None else length.to(self.step).clone()
        self.tau = torch.ones(self.step.shape, dtype=torch.float32, device=self.step.device)

    def view(self, rows: slice) -> StepState:
        """The same counters for ``rows`` only: views, so advancing this state advances the view."""
        part = StepState(self.max_new_tokens)
        part.position, part.step = self.position[rows], self.step[rows]
        part.length, part.tau = self.length[rows], self.tau[rows]
        return part

    def set_row(self, row: int, position: int, step: int, length: int) -> None:
        """Point ``row`` at a new request whose last processed token sits at ``position`` (its prompt's end)."""
        self.position[row], self.step[row], self.length[row] = position, step, length

    def copy_row(self, source: int, row: int) -> None:
        """Point ``row`` where ``source`` stands (a request moving between rows)."""
        for tensor in (self.position, self.step, self.length, self.tau):
            tensor[row] = tensor[source]

    def advance(self, policy: Policy, tempered: bool) -> None:
        """Every row moves to its next token, in place (a captured graph replays this)."""
        self.position += 1
        self.step += 1
        if tempered:
            self.tau.copy_(policy.temperature(self.step, self.length))

    def to(self, device: torch.device) -> StepState:
        """This state on ``device``: itself when it is there already (one device), else a copy of its counters
        for this step (a layer on another device of a model split by ``device_map``)."""
        if self.position is None or self.position.device == device:
            return self
        copy = StepState(self.max_new_tokens)
        copy.position, copy.step, copy.length, copy.tau = (
            t.to(device) for t in (self.position, self.step, self.length, self.tau)
        )
        return copy

    def reset(self) -> None:
        self.position = self.step = self.length = self.tau = None
