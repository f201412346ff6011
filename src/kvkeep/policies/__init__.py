"""Eviction policies; each is one small dataclass in its own file, registered by name."""

from . import co2, full, h2o, keyformer, streaming, window  # noqa: F401  (registration)
from .base import POLICIES, Policy, ScoreSpec, ScoringPolicy, StepInfo, make_policy, protected, reduce_heads
from .co2 import CO2Policy
from .full import FullPolicy
from .h2o import H2OPolicy
from .keyformer import KeyformerPolicy
from .streaming import StreamingPolicy
from .window import WindowPolicy

# Registry order = the order users read them in (baseline first, then by sophistication).
for _name in ("full", "window", "streaming", "h2o", "keyformer", "co2"):
    POLICIES[_name] = POLICIES.pop(_name)

__all__ = [
    "POLICIES",
    "CO2Policy",
    "FullPolicy",
    "H2OPolicy",
    "KeyformerPolicy",
    "Policy",
    "ScoreSpec",
    "ScoringPolicy",
    "StepInfo",
    "StreamingPolicy",
    "WindowPolicy",
    "make_policy",
    "protected",
    "reduce_heads",
]
