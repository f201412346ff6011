"""The policy contract: what a cache layer keeps, and the score that ranks what it may drop.

A policy sees one layer's cache as slots ``[batch, kv_heads, slots]``.  It protects the first ``sinks``
tokens and the most recent ``recent_size(k)`` tokens, and fills the rest of its budget ``k`` with the
highest-scoring candidates.  Scoring policies turn the attention logits of every step into a per-token
score (``step_scores``) and fold it into a running score (``accumulate``).  The machinery that calls them
lives once, in :mod:`kvkeep.cache` and :mod:`kvkeep.attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

HEAD_REDUCTIONS = ("mean", "sum", "max")


@dataclass
class StepInfo:
    """What a scoring policy may know about the step being scored.

    Attributes:
        layer_idx: index of the decoder layer.
        step: generation step; 0 for the prompt, t for the forward that feeds the t-th generated token.
        query_positions: ``[batch, rows]`` true positions of the query rows (left padding removed).
        key_positions: ``[batch, kv_heads, slots]`` true positions of the keys (-1 for empty slots).
        total_steps: number of tokens the generation will produce, when known (Keyformer's schedule).
    """

    layer_idx: int
    step: int
    query_positions: torch.Tensor
    key_positions: torch.Tensor
    total_steps: int | None = None


@dataclass
class Policy:
    """Base of every policy.  Subclasses are small dataclasses registered in :data:`POLICIES`.

    Args:
        budget: a float in (0, 1] is a share of the prompt length (``k = floor(budget * n)``, at least 1);
            an int >= 1 is an absolute number of kept tokens per layer and KV head.
        sinks: number of first tokens that are always kept ("attention sinks").
    """

    budget: float | int | None = None
    sinks: int = 0

    name: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False
    #: True for the baseline that keeps everything (no budget).
    keeps_all: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.keeps_all:
            if self.budget is not None:
                raise ValueError(f"policy '{self.name}' keeps every token and takes no budget; drop budget=")
            return
        b = self.budget
        if b is None:
            raise ValueError(f"policy '{self.name}' needs a budget: a ratio in (0, 1] or a token count >= 1")
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget must be a float ratio in (0, 1] or an int >= 1, got {b!r}")
        if isinstance(b, float) and not (0.0 < b <= 1.0):
            raise ValueError(
                f"budget ratio {b} is outside (0, 1]: pass a share of the prompt such as 0.5, "
                "or an int for an absolute token count"
            )
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget {b} tokens is < 1: pass an int >= 1 or a ratio in (0, 1]")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")
        if isinstance(b, int):
            self.check_budget(b)

    def check_budget(self, k: int, prompt_len: int | None = None) -> None:
        """Raise if a budget of ``k`` tokens cannot hold the protected sinks and recent window."""
        if prompt_len is not None and prompt_len < self.sinks:
            raise ValueError(
                f"prompt of {prompt_len} tokens is shorter than the {self.sinks} attention sinks of "
                f"'{self.name}': lower sinks= or use a longer prompt"
            )
        if self.sinks > k or self.sinks + self.recent_size(k) > k:
            raise ValueError(
                f"budget of {k} tokens is smaller than sinks ({self.sinks}) + recent window "
                f"({self.recent_size(k)}) of '{self.name}': raise the budget or lower sinks/recent share"
            )

    # -- budget -------------------------------------------------------------------------------------
    def budget_tokens(self, prompt_len: int) -> int | None:
        """Kept tokens per layer and KV head for a prompt of ``prompt_len`` real tokens (None: no limit)."""
        if self.keeps_all:
            return None
        if isinstance(self.budget, float):
            return max(1, math.floor(self.budget * prompt_len + 1e-9))
        return int(self.budget)

    def recent_size(self, k: int) -> int:
        """How many of the newest tokens are always kept under a budget of ``k``."""
        return k

    def evict_after(self) -> int:
        """Generation steps during which nothing is evicted (CO2's measurement step ``N``)."""
        return 0

    # -- scores -------------------------------------------------------------------------------------
    def step_scores(self, logits: torch.Tensor, allowed: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """Per-row score contributions of one chunk of query rows.

        Args:
            logits: ``[batch, kv_heads, group, rows, slots]`` float32 attention logits (scale and
                positional bias applied, not masked).
            allowed: ``[batch, kv_heads, 1, rows, slots]`` bool, which keys each row may attend to.
        Returns:
            ``[batch, kv_heads, group, rows, slots]`` float32, zero where not allowed.
        """
        raise NotImplementedError(f"policy '{self.name}' does not score tokens")

    def accumulate(self, running: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Fold a step's scores ``[batch, kv_heads, slots]`` into the running score (same shape)."""
        return running + step

    # -- display ------------------------------------------------------------------------------------
    def params(self) -> dict:
        """Every parameter as a plain dict (for logs, JSON and sweeps)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that ignores disallowed entries and never yields NaN.

    Rows with no allowed entry give all zeros.  ``logits`` must be float32.
    """
    masked = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    probs = torch.softmax(masked, dim=-1)
    return probs * allowed


@dataclass
class ScoringPolicy(Policy):
    """A policy that ranks candidates by an attention-derived score.

    Args:
        head_reduce: how the query heads that share a KV head (GQA/MQA) combine their scores:
            ``"mean"`` (default), ``"sum"`` or ``"max"``.
    """

    head_reduce: str = "mean"

    needs_scores: ClassVar[bool] = True

    def kernel_args(self, layer_idx: int) -> dict:
        """How the fused decode kernel computes this policy's score: ``score_mode`` and EWMA ``decay``."""
        return {"score_mode": "probs", "decay": 0.0}

    def validate(self) -> None:
        super().validate()
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {', '.join(HEAD_REDUCTIONS)}, got {self.head_reduce!r}")


def check_share(name: str, value: float) -> None:
    """Raise unless ``value`` is a share in [0, 1]."""
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a share in [0, 1], got {value!r}")


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: add a policy to :data:`POLICIES` under its ``name``."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(policy: str | Policy, budget: float | int | None = None, **params) -> Policy:
    """Build a policy from its name and parameters, or pass an instance through.

    Raises:
        ValueError: unknown policy name or parameter.
    """
    if isinstance(policy, Policy):
        if budget is not None or params:
            raise ValueError("pass either a Policy instance or a policy name with parameters, not both")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}': choose one of {', '.join(POLICIES)}")
    cls = POLICIES[policy]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"policy '{policy}' has no parameter {', '.join(unknown)}: its parameters are {', '.join(sorted(known))}"
        )
    return cls(budget=budget, **params)
