"""Window attention: keep the ``k`` most recent tokens (Keyformer's "Window Attention" baseline)."""

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, register


@register
@dataclass
class WindowPolicy(Policy):
    """Keeps the ``k`` newest tokens (plus ``sinks`` first ones if asked; 0 by default)."""

    name: ClassVar[str] = "window"

    def recent_size(self, k: int) -> int:
        return max(0, k - self.sinks)
