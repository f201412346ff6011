"""The policy contract: what a cache layer keeps, and the score that ranks what it may drop.

A policy sees one layer's cache as slots ``[batch, kv_heads, slots]`` holding each token's true position
(-1 for an empty slot).  It protects the first ``sinks`` positions and the ``recent_size(k)`` newest ones
(:func:`protected`), and fills the rest of its budget ``k`` with the highest-scoring candidates.  A scoring
policy states what its score needs in a :class:`ScoreSpec` (the cache and the kernels read nothing else),
turns the attention logits of every step into per-token contributions (``step_scores``) and folds them into
a running score (``accumulate``).  The machinery that calls them lives once, in :mod:`kvkeep.cache` and
:mod:`kvkeep.attention`; adding a policy is one file here.

Learned attention sinks (gpt-oss style: one logit ``s_h`` per query head, an extra softmax column that attends
to nothing, ``StepInfo.sink_logits``): the model's attention probabilities are ``exp(x_j) / (sum_i exp(x_i) +
exp(s_h))``, the sink's own share dropped.  A ``probs`` score (H2O, CO2) adds exactly these, the probabilities
the model uses; a ``tempered`` score (Keyformer) stays a distribution over the real keys alone
(``softmax((x + g) / tau)``, no sink term: the paper has none, and noise on a logit that is no token has no
meaning).  The kernels apply the same rule.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from .noise import gumbel_noise

HEAD_REDUCTIONS = ("mean", "sum", "max")
#: Defaults of the prompt-scoring options (measured in RESULTS.md, "Keeping what the question needs").
DEFAULT_FLOOR = 256
DEFAULT_OBSERVE = 32
DEFAULT_POOL = 31
SCORE_MODES = ("probs", "tempered")


@dataclass(frozen=True)
class ScoreSpec:
    """What a scoring policy's score needs from attention: the one description the cache and kernels read.

    Attributes:
        mode: ``"probs"`` adds the softmax probabilities of each query (H2O, CO2); ``"tempered"`` adds
            ``softmax((logits + noise) / tau)`` with the policy's :meth:`Policy.temperature` (Keyformer).
        head_reduce: how the query heads that share a KV head combine (``mean``, ``sum``, ``max``).
        decay: 0 adds each step to the running score; ``a > 0`` folds it as ``(1 - a) * running + a * step``.
        noise_seed: seed of the counter-based Gumbel noise added to the logits (``tempered`` only; None: none).
        observe: at a prompt, its last ``observe`` query rows (the observation window) score the keys apart
            (0: no window).
        pool: the window's score of each key becomes the mean over the ``pool`` positions centred on it (1: none).
        every_query: with a window, every prompt row scores too, and the two parts are added at equal weight;
            False: the window alone scores the prompt.
    """

    mode: str = "probs"
    head_reduce: str = "mean"
    decay: float = 0.0
    noise_seed: int | None = None
    observe: int = 0
    pool: int = 1
    every_query: bool = True

    @property
    def tempered(self) -> bool:
        return self.mode == "tempered"


@dataclass
class StepInfo:
    """What a scoring policy may know about the step being scored.

    Attributes:
        layer_idx: index of the decoder layer.
        step: generation step, an int or ``[batch]`` (0 for the prompt, t for the forward feeding token t).
        query_positions: ``[batch, rows]`` true positions of the query rows (padding rows: negative).
        key_positions: ``[batch, kv_heads, slots]`` true positions of the keys (-1 for empty slots).
        total_steps: tokens the generation produces (the temperature schedule's length), an int, ``[batch]``
            or None when unknown.
        head_offset: the model's index of the first KV head of ``key_positions`` (under tensor parallelism a
            rank holds heads ``[head_offset, head_offset + kv_heads)``; 0 otherwise).
        sink_logits: ``[q_heads]`` the model's learned sink logit per query head (gpt-oss), or None (see the
            module docstring for how a score uses it).
    """

    layer_idx: int
    step: int | torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor
    total_steps: int | torch.Tensor | None = None
    head_offset: int = 0
    sink_logits: torch.Tensor | None = None


def is_real(value) -> bool:
    """A finite real number (int, float or NumPy scalar), not a bool (nor NaN or an infinity)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def is_integer(value) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value) -> int:
    """``value`` as an int, or a one-line ``ValueError`` unless it is an integer >= 1."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def protected(positions: torch.Tensor, newest: torch.Tensor, recent: torch.Tensor, sinks: int) -> torch.Tensor:
    """Which slots no eviction may touch: the first ``sinks`` positions and the ``recent`` newest ones.

    Args:
        positions: ``[B, H, S]`` true position of each slot, -1 for an empty slot.
        newest: ``[B]`` position of each sequence's newest token.
        recent: ``[B]`` size of each sequence's recent window.
    Returns:
        ``[B, H, S]`` bool (False for empty slots).  The Triton slot kernel applies the same rule.
    """
    newest, recent = newest.view(-1, 1, 1), recent.view(-1, 1, 1)
    return (positions >= 0) & ((positions < sinks) | (positions > newest - recent))


def reduce_heads(per_head: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the scores ``[B, H_kv, group, S]`` of the query heads sharing a KV head: ``[B, H_kv, S]``."""
    if how == "sum":
        return per_head.sum(dim=2)
    if how == "max":
        return per_head.amax(dim=2)
    return per_head.mean(dim=2)


def pool_scores(scores: torch.Tensor, kernel: int, real: torch.Tensor) -> torch.Tensor:
    """Each slot's score as the mean over the real slots among the ``kernel`` centred on it (slots in position
    order), so a kept token brings its phrase: a needle's digits share the score of the words the question
    matched.  Empty slots (padding) count in neither sum nor divisor, so a sequence pools alike alone or in a
    left-padded batch.

    Args:
        scores: ``[B, H, S]`` float32; real: ``[B, H, S]`` bool, the slots holding a token.
    Returns:
        ``[B, H, S]`` float32, 0 where not ``real``.  ``kernel`` 1 returns ``scores`` unchanged.
    """
    if kernel <= 1:
        return scores
    batch, heads, slots = scores.shape
    flat = (batch * heads, 1, slots)
    total = F.avg_pool1d(torch.where(real, scores, 0.0).reshape(flat), kernel, 1, kernel // 2)
    count = F.avg_pool1d(real.to(scores.dtype).reshape(flat), kernel, 1, kernel // 2)
    return torch.where(real, (total / count.clamp_min(1e-12)).view(batch, heads, slots), 0.0)


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor, sink_logits: torch.Tensor | None = None):
    """Softmax over the last dim that ignores disallowed entries and never yields NaN.

    Rows with no allowed entry give all zeros.  ``logits`` must be float32.  ``sink_logits`` (broadcast to
    ``logits.shape[:-1] + (1,)``, e.g. ``[1, kv_heads, group, 1, 1]``): a learned sink, an extra column in each
    row's denominator whose own probability is dropped (gpt-oss).
    """
    masked = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    if sink_logits is None:
        return torch.softmax(masked, dim=-1) * allowed
    sink = sink_logits.to(logits.dtype).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat([masked, sink], dim=-1), dim=-1)[..., :-1]
    return probs * allowed


def sink_view(sink_logits: torch.Tensor | None, kv_heads: int) -> torch.Tensor | None:
    """``[q_heads]`` sink logits as ``[1, kv_heads, group, 1, 1]`` float32 (the logits' layout), or None."""
    if sink_logits is None:
        return None
    return sink_logits.float().view(1, kv_heads, -1, 1, 1)


@dataclass
class Policy:
    """Base of every policy.  Subclasses are small dataclasses registered in :data:`POLICIES`.

    Args:
        budget: a float in (0, 1] is a share of the prompt length (``k = floor(budget * n)``, at least 1);
            an int >= 1 is an absolute number of kept tokens per layer and KV head.
        sinks: number of first tokens that are always kept ("attention sinks").
        floor: a ratio budget never keeps fewer than ``floor`` tokens (a prompt shorter than it keeps every
            token); an int budget is an exact count and is never raised.  0: no floor.
    """

    budget: float | int | None = None
    sinks: int = 0
    floor: int = DEFAULT_FLOOR

    name: ClassVar[str] = ""
    #: True for the baseline that keeps everything (no budget).
    keeps_all: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for field in fields(self):  # NumPy scalars (np.float32(0.5)) become plain Python numbers
            setattr(self, field.name, _plain_number(getattr(self, field.name)))
        self.validate()

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.keeps_all:
            if self.budget is not None:
                raise ValueError(f"policy '{self.name}' keeps every token and takes no budget; drop budget=")
            if self.floor != DEFAULT_FLOOR:
                raise ValueError(f"policy '{self.name}' keeps every token and takes no floor; drop floor=")
            return
        b = self.budget
        if b is None:
            raise ValueError(f"policy '{self.name}' needs a budget: a ratio in (0, 1] or a token count >= 1")
        if not is_real(b):
            raise ValueError(f"budget must be a float ratio in (0, 1] or an int >= 1, got {b!r}")
        if isinstance(b, float) and not (0.0 < b <= 1.0):
            raise ValueError(
                f"budget ratio {b} is outside (0, 1]: pass a share of the prompt such as 0.5, "
                "or an int for an absolute token count"
            )
        if isinstance(b, int) and b < 1:
            raise ValueError(f"budget {b} tokens is < 1: pass an int >= 1 or a ratio in (0, 1]")
        if not is_integer(self.sinks) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")
        if not is_integer(self.floor) or self.floor < 0:
            raise ValueError(f"floor must be an int >= 0 (tokens a ratio budget always keeps), got {self.floor!r}")
        if isinstance(b, int):
            self.check_budget(b)

    def check_budget(self, k: int, prompt_len: int | None = None) -> None:
        """Raise if a budget of ``k`` tokens cannot hold the protected sinks and recent window."""
        if prompt_len == 0:
            raise ValueError(
                "a prompt of the batch is empty (its attention mask row is all zeros): give each sequence at least "
                "one token"
            )
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
            return max(1, self.floor, math.floor(self.budget * prompt_len + 1e-9))
        return self.budget

    def budget_for(self, prompt_len: int) -> int | None:
        """:meth:`budget_tokens` of a ``prompt_len``-token prompt, checked (:meth:`check_budget`): the one check of
        a budget against its prompt."""
        kept = self.budget_tokens(prompt_len)
        if kept is not None:
            self.check_budget(kept, prompt_len)
        return kept

    def floored(self, prompt_len: int) -> bool:
        """True when the floor, not the ratio, sets the budget of a ``prompt_len``-token prompt."""
        return (
            not self.keeps_all
            and isinstance(self.budget, float)
            and self.floor > max(1, math.floor(self.budget * prompt_len + 1e-9))
        )

    def replace(self, **changes) -> Policy:
        """A copy with ``changes`` (a request's own budget or options), validated; unknown names raise."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"policy '{self.name}' has no parameter {', '.join(unknown)}")
        return type(self)(**{**self.params(), **changes})

    def recent_size(self, k: int) -> int:
        """How many of the newest tokens are always kept under a budget of ``k``."""
        return k

    def evict_after(self) -> int:
        """Generation steps during which nothing is evicted (CO2's measurement step ``N``)."""
        return 0

    # -- scores -------------------------------------------------------------------------------------
    def score_spec(self) -> ScoreSpec | None:
        """What this policy's score needs from attention; None for a policy that keeps no score."""
        return None

    def temperature(self, step: torch.Tensor, total_steps: torch.Tensor | None) -> torch.Tensor:
        """The score's temperature at generation ``step`` ``[B]`` of ``total_steps`` ``[B]``: ``[B]`` float32.

        Only ``tempered`` scores read it; the default is 1 throughout.
        """
        return torch.ones(step.shape, dtype=torch.float32, device=step.device)

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
        """Every parameter as a plain dict (for logs, JSON and sweeps); a policy that keeps everything has no floor."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not (self.keeps_all and f.name == "floor")}


def _plain_number(value):
    """NumPy and other numeric scalars (and 0-d arrays or tensors of a number) as Python ints/floats, so JSON,
    ``isinstance`` and budgets agree; anything else unchanged (validation names it)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


@dataclass
class ScoringPolicy(Policy):
    """A policy that ranks candidates by an attention-derived score.

    Args:
        head_reduce: how the query heads that share a KV head (GQA/MQA) combine their scores:
            ``"mean"`` (default), ``"sum"`` or ``"max"``.
        observe: the observation window (after SnapKV): at a prompt, its last ``observe`` query rows, where a
            question sits, score the keys apart, and their score is added to every row's at equal weight
            (``every + (n / observe) * pool(window)`` for an ``n``-token prompt), so a fact that only the
            question attends to is kept.  0: every prompt row scores alike, as H2O, Keyformer and CO2 were
            published.  The policy's own score form and its rule while decoding are unchanged.
        pool: the window's score of each key becomes the mean over the ``pool`` positions centred on it (odd;
            1: none), so a kept token keeps the words around it.
        every_query: False: the window alone scores the prompt (SnapKV's rule; ``observe`` >= the prompt with
            ``pool=1`` then equals the published rule).
    """

    head_reduce: str = "mean"
    observe: int = DEFAULT_OBSERVE
    pool: int = DEFAULT_POOL
    every_query: bool = True

    def score_spec(self) -> ScoreSpec:
        return ScoreSpec(
            mode="probs", head_reduce=self.head_reduce, observe=self.observe, pool=self.pool,
            every_query=self.every_query,
        )  # fmt: skip

    def step_scores(self, logits: torch.Tensor, allowed: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """The score the :meth:`score_spec` describes, in torch (the kernels compute the same from the spec)."""
        spec = self.score_spec()
        if spec.tempered:
            if spec.noise_seed is not None:
                _, kv_heads, group, _, _ = logits.shape
                logits = logits + gumbel_noise(
                    spec.noise_seed, info.layer_idx, info.query_positions, info.key_positions, kv_heads, group,
                    info.head_offset,
                )  # fmt: skip
            tau = self.temperature(torch.as_tensor(info.step), info.total_steps).to(logits.device)
            return masked_softmax(logits / (tau.view(-1, 1, 1, 1, 1) if tau.dim() == 1 else tau), allowed)
        return masked_softmax(logits, allowed, sink_view(info.sink_logits, logits.shape[1]))

    def accumulate(self, running: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The running score after a step, by the spec's ``decay`` (0: a plain sum)."""
        decay = self.score_spec().decay
        return running + step if decay == 0 else (1.0 - decay) * running + decay * step

    def validate(self) -> None:
        super().validate()
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {', '.join(HEAD_REDUCTIONS)}, got {self.head_reduce!r}")
        if not is_integer(self.observe) or self.observe < 0:
            raise ValueError(
                f"observe must be an int >= 0 (the last prompt queries that score it; 0: all), got {self.observe!r}"
            )
        if not isinstance(self.every_query, bool):
            raise ValueError(f"every_query must be true or false, got {self.every_query!r}")
        if not is_integer(self.pool) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd int >= 1 (positions pooled over; 1: none), got {self.pool!r}")


def check_share(name: str, value: float) -> None:
    """Raise unless ``value`` is a share in [0, 1]."""
    if not is_real(value) or not 0.0 <= value <= 1.0:
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
