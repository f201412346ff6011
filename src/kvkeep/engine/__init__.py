"""kvkeep's serving engine: continuous batching over rows of the compressed cache.

- :mod:`.request`: one request's state, its events, the incremental detokenizer (stop strings).
- :mod:`.planner`: how many rows fit in the memory, how wide each is, the prefill piece.
- :mod:`.rows`: the engine's cache (every layer's rows) and the moves of requests between rows.
- :mod:`.runner`: a prompt's prefill into its row, and the decode step over every row (CUDA graph on a GPU).
- :mod:`.engine`: admission, the loop, finishing and cancelling.
"""

from .engine import Engine, QueueFull, build
from .planner import ModelFacts, Plan, plan
from .request import Event, Request

__all__ = ["Engine", "Event", "ModelFacts", "Plan", "QueueFull", "Request", "build", "plan"]
