"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a recent window."""

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, register


@register
@dataclass
class StreamingPolicy(Policy):
    """Keeps the first ``sinks`` tokens and the ``k - sinks`` newest ones."""

    sinks: int = 4

    name: ClassVar[str] = "streaming"

    def recent_size(self, k: int) -> int:
        return max(0, k - self.sinks)
