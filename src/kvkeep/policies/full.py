"""Full attention: the baseline every result is measured against."""

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy, register


@register
@dataclass
class FullPolicy(Policy):
    """Keeps every token; takes no budget."""

    name: ClassVar[str] = "full"
    keeps_all: ClassVar[bool] = True
