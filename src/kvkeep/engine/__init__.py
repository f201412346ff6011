"""kvkeep's serving engine: continuous batching over rows of the compressed cache.

- :mod:`.request`: one request's state, its events, the incremental detokenizer (stop strings).
- :mod:`.planner`: how many rows fit in the memory, how wide each is, the prefill piece.
- :mod:`.seats`: which rows each request holds (a CO2 request's measurement row, then its own).
- :mod:`.runner`: a prompt's prefill into its row, and the decode step over every row (CUDA graph on a GPU);
  the rows themselves are :class:`kvkeep.cache.rows.RowCache`.
- :mod:`.handoff`: their outputs on the way to the host (pinned copies and an event), read without waiting for
  the step launched after them.
- :mod:`.engine`: admission, the loop, finishing and cancelling.
- :mod:`.lockstep`: the engine on one rank of a tensor-parallel group.
- :mod:`.build`: the engine for a model and a memory budget.
"""

from .build import build
from .engine import Engine, EngineStopped, QueueFull
from .lockstep import LockstepEngine
from .planner import ModelFacts, Plan, plan
from .request import Event, Request

__all__ = [
    "Engine", "EngineStopped", "Event", "LockstepEngine", "ModelFacts", "Plan", "QueueFull", "Request", "build", "plan",
]  # fmt: skip
