"""The one decode step, shared by :func:`kvkeep.generate` and the serving engine, and its CUDA-graph capture.

A step feeds every row's token at its position, runs the model over the cache (whose layers attend, score
and evict), and writes each row's next token in place.  On a static ``KVKeepCache`` whose layers are all in
slot mode the step has fixed shapes and addresses and reads no host value, so it is captured once as a CUDA
graph and replayed: hundreds of kernel launches become one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .hf import with_cache

#: ``choose(logits [rows, vocab]) -> [rows]`` the next token of each row (reading its own device counters).
Chooser = Callable[[torch.Tensor], torch.Tensor]


class DecodeStep:
    """One decode step over fixed buffers, advanced in place.

    Args:
        model: the causal LM; cache: the cache it decodes with (a static kvkeep cache in slot mode to capture).
        tokens: ``[rows, 1]`` int64, the tokens fed; the step overwrites them with the chosen next ones.
        choose: picks each row's next token from the step's logits (see :data:`Chooser`).
        positions: ``[rows, 1]`` int64 true position of the fed tokens, advanced by one in place; None: the
            cache's step counters say where each row stands (the engine's rows, each at its own position).
        after: device work run after each step, in its graph (the engine's per-row bytes); its output is
            :attr:`after_out` (the graph's buffer once captured: read it before the next step).
    """

    def __init__(self, model, cache, tokens: torch.Tensor, choose: Chooser, positions: torch.Tensor | None = None,
                 after: Callable[[], torch.Tensor] | None = None):  # fmt: skip
        self.model, self.cache, self.tokens, self.choose, self.positions = model, cache, tokens, choose, positions
        self.after, self.after_out = after, None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [rows, vocab]: the captured step's output buffer

    def run(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One step through Python (``attention_mask`` ``[rows, seen + 1]`` for a cache that reads padding);
        returns its logits ``[rows, vocab]``."""
        positions = self.cache.state.position[:, None] + 1 if self.positions is None else self.positions
        logits = self.model(
            input_ids=self.tokens, position_ids=positions, attention_mask=attention_mask, use_cache=True,
            logits_to_keep=1, **with_cache(self.model, self.cache),
        ).logits[:, -1]  # fmt: skip
        self.tokens.copy_(self.choose(logits)[:, None])
        if self.positions is not None:
            self.positions.add_(1)
        if self.after is not None:
            self.after_out = self.after()
        return logits

    def capture(self) -> None:
        """Record one step as a CUDA graph (recorded, not run: each replay runs it).  The host counters the
        recording advanced are rolled back; :meth:`__call__` advances them after each replay."""
        graph = torch.cuda.CUDAGraph()
        with self.cache.capture(), torch.cuda.graph(graph):
            self.logits = self.run()
        self.graph = graph

    def release(self) -> None:
        """Forget the captured graph (the cache replaced its buffers): steps run through Python until :meth:`capture`
        records one again.  Waits for the device first: a replay may still be running."""
        if self.graph is not None:
            torch.cuda.synchronize(self.tokens.device)
        self.graph = self.logits = self.after_out = None

    def __call__(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One step: the graph's replay once captured, else :meth:`run`; returns the logits ``[rows, vocab]``."""
        if self.graph is None:
            return self.run(attention_mask)
        self.graph.replay()
        self.cache.replayed_step()
        return self.logits
