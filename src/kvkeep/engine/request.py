"""One request's state in the engine, and the incremental detokenizer that finds stop strings.

A request holds a row of the engine's cache from admission to its end.  Its tokens stream out as
:class:`Event` objects; text is released only once no stop string can still begin inside it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..policies import Policy
from ..sampling import GREEDY, Sampling
from .seats import Seat

_ids = itertools.count()

#: Why a request ended, as the OpenAI API names it (plus ``cancelled`` and ``error``).
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class Event:
    """What a request produced since its last event.

    Attributes:
        token_ids: the new tokens.
        text: the new text (held back while it could still be the start of a stop string).
        finish_reason: set on the request's last event.
        request: the request itself (usage counts, KV bytes, timings).
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None
    request: Request


@dataclass
class Request:
    """A generation request.

    Args:
        prompt_ids: the prompt's token ids.
        max_tokens: tokens to generate at most.
        sampling: greedy by default.
        stop: strings that end the generation (not included in the output).
        stop_ids: token ids that end it (the model's end of sequence; included in ``output_ids``).
        budget: the request's own KV budget (None: the engine's).
        policy_options: the request's own prompt-scoring options (``observe``, ``pool``, ``floor``).
        logprobs: record each output token's log-probability with this many likeliest alternatives (0 to 20;
            None: none); with ``echo`` the prompt's too (its first token has none).
        echo: the prompt's text comes before the output's in the response.
        on_event: called from the engine's thread with every :class:`Event`.
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = GREEDY
    stop: list[str] = field(default_factory=list)
    stop_ids: set[int] = field(default_factory=set)
    budget: float | int | None = None
    policy_options: dict = field(default_factory=dict)
    logprobs: int | None = None
    echo: bool = False
    on_event: Callable[[Event], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def __post_init__(self) -> None:
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.seat: Seat | None = None  # its rows of the engine's cache, once admitted
        self.policy: Policy | None = None  # the engine's policy with the request's own budget and options
        self.cancelled = False
        self.computed = 0  # tokens the device has chosen for it: ``output_ids`` and the step in flight, if any
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.kv_bytes = 0  # what its row holds at the end (the compressed cache)
        self.kv_bytes_peak = 0  # the most its row held (CO2's measurement phase included)
        self.kv_bytes_full = 0  # what full attention holds for its tokens at the end
        self.floored = False  # the policy's floor, not its ratio, set the budget
        # (log-probability, [(token, log-probability)] of the likeliest) per prompt token after the first
        # (with logprobs and echo) and per output token (with logprobs)
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
        self.output_logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.detokenizer: Detokenizer | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def policy_changes(self) -> dict:
        """What this request changes in the engine's policy: its budget and prompt-scoring options."""
        return {**({} if self.budget is None else {"budget": self.budget}), **self.policy_options}


class Detokenizer:
    """Turns a growing list of token ids into text deltas, stopping at the earliest stop string.

    Each step decodes only the newest tokens: the ids from ``prefix`` to ``read`` are decoded twice, alone and
    with the new ones, and the difference is the new text (so a tokenizer that treats the first token of a
    piece differently, or a UTF-8 character split over tokens, comes out as in one decode of the whole).
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # the output's text so far
        self.prefix = self.read = 0  # ids[prefix:read] already in ``text``: the context of the next decode
        self.emitted = 0  # characters of ``text`` already released

    def _extend(self, ids: list[int], final: bool) -> None:
        decode = self.tokenizer.decode
        known = decode(ids[self.prefix : self.read], skip_special_tokens=True)
        both = decode(ids[self.prefix :], skip_special_tokens=True)
        if both.endswith("\ufffd") and not final:  # an incomplete UTF-8 character: wait for the next token
            return
        self.text += both[len(known) :]
        self.prefix, self.read = self.read, len(ids)

    def feed(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """The new text of ``ids`` (the whole output so far), and whether a stop string ended it."""
        self._extend(ids, final)
        found = [f for s in self.stop if (f := self.text.find(s, max(0, self.emitted - len(s)))) >= 0]
        if found:
            delta = self.text[self.emitted : min(found)]
            self.emitted = min(found)
            return delta, True
        ready = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : ready]
        self.emitted = ready
        return delta, False
