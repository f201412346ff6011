"""The OpenAI wire format kvkeep speaks: request bodies (validated) and response / stream-chunk bodies.

Fields follow one rule: kvkeep either does what a field asks or refuses the request with a 400 that names it
(:func:`unsupported`); a field it does not know is refused too.  Values are checked strictly (``"5"`` or
``true`` is not a number), as the Python API checks them.

Requests may carry a ``kvkeep`` object (``extra_body={"kvkeep": {...}}`` in the ``openai`` client) with the
request's own KV ``budget``, prompt-scoring options (``observe``, ``pool``, ``floor``: see
:class:`kvkeep.policies.ScoringPolicy`) and ``ignore_eos`` (benchmarks with fixed output lengths); any other
key there is an error.  Every response reports the KV bytes its request held at the end (``kvkeep.kv_bytes``),
the most it held (``kv_bytes_peak``), what full attention would hold (``kv_bytes_full``) and whether the
policy's floor set its budget (``floored``).
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

KVKEEP_KEYS = ("budget", "observe", "pool", "floor", "ignore_eos")
#: The most choices (``n``) one request may ask for: each runs as its own engine request, in its own row.
MAX_CHOICES = 16
POLICY_KEYS = ("observe", "pool", "floor")


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


#: Fields kvkeep accepts only at the value that asks for nothing (what OpenAI's clients and harnesses send by
#: default); any other value is refused by name.
NO_OP = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
#: Fields that change nothing kvkeep computes (bookkeeping for the client): accepted with any value.
INERT = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
#: Message fields beyond ``role`` and ``content`` that the chat template receives.
MESSAGE_KEYS = ("name",)


#: What a field of several accepted types must be (pydantic names each type's error apart).
TYPE_MESSAGES = {
    "prompt": "must be a string, a list of token ids, or a list of one string or one list of token ids",
    "kvkeep.budget": "must be a number: a share of the prompt in (0, 1] or a token count",
    "temperature": "must be a number",
    "top_p": "must be a number",
    "stop": "must be a string or a list of strings",
}


def field_error(error: dict) -> tuple[str, str]:
    """``(field, message)`` of one pydantic error: the field's dotted path without pydantic's type tags."""
    path = [str(p) for p in error.get("loc", ()) if p != "body" and not _type_tag(p)]
    where = ".".join(path)
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if str(error.get("type", "")).endswith("_type"):
        message = TYPE_MESSAGES.get(where, message)
    return where, message


def _type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool"))


def unsupported(body: BaseModel) -> tuple[str, str] | None:
    """``(field, message)`` for the first field of ``body`` that kvkeep does not do, else None."""
    extras = dict(body.model_extra or {})
    for i, message in enumerate(getattr(body, "messages", ())):
        for key in message.model_extra or {}:
            if key not in MESSAGE_KEYS:
                return f"messages.{i}.{key}", f"messages.{i}.{key}: message field {key!r} is not supported"
    for key, value in extras.items():
        if key in INERT or value is None:
            continue
        if key in NO_OP:
            if not any(type(value) is type(ok) and value == ok for ok in NO_OP[key]):
                return key, f"{key}={value!r} is not supported by kvkeep serve: leave it out"
            continue
        return key, f"unknown field {key!r}: see the README's list of the fields kvkeep serve takes"
    return None


class KVKeepOptions(BaseModel):
    """kvkeep's own request options."""

    model_config = ConfigDict(extra="forbid")
    budget: StrictInt | StrictFloat | None = None
    observe: int | None = Field(default=None, strict=True)
    pool: int | None = Field(default=None, strict=True)
    floor: int | None = Field(default=None, strict=True)
    ignore_eos: bool = False

    def policy_options(self) -> dict:
        """The prompt-scoring options the request sets (checked by the policy: a 400 names a bad one)."""
        return {key: getattr(self, key) for key in POLICY_KEYS if getattr(self, key) is not None}


class _Sampled(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = Field(default=None, validate_default=True)
    top_p: StrictFloat | StrictInt | None = Field(default=None, validate_default=True)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    kvkeep: KVKeepOptions | None = None

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _positive(cls, value, info):
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if value is None:
            return 1.0
        if not 0 <= value <= 2:
            raise ValueError("temperature must be in [0, 2]")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value):
        if value is None:
            return 1.0
        if not 0 < value <= 1:
            raise ValueError("top_p must be in (0, 1]")
        return value

    @field_validator("n")
    @classmethod
    def _choices(cls, value):
        if not 1 <= value <= MAX_CHOICES:
            raise ValueError(f"n must be in [1, {MAX_CHOICES}]")
        return value

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("stop takes at most 4 strings")
        return stops


class CompletionRequest(_Sampled):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    logprobs: StrictInt | None = None  # the likeliest alternatives per token (0 to 20); None: no log-probabilities
    echo: StrictBool = False  # the prompt before the completion, and its log-probabilities with ``logprobs``


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def template_message(self) -> dict:
        """The message as the chat template reads it."""
        return {"role": self.role, "content": self.text(), **(self.model_extra or {})}

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None  # the likeliest alternatives per token (0 to 20), with ``logprobs``

    @property
    def top(self) -> int | None:
        """The engine's ``logprobs``: alternatives per token, None when log-probabilities are off."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _some(cls, value):
        if not value:
            raise ValueError("messages must not be empty")
        return value


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(requests: list) -> dict:
    """Token counts of the engine requests behind one response (one per choice; the prompt counts once)."""
    completion = sum(len(request.output_ids) for request in requests)
    prompt = requests[0].prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def kv_report(requests: list) -> dict:
    """KV bytes the engine requests behind one response held, summed over its choices (each has its row)."""
    return {
        "kv_bytes": sum(request.kv_bytes for request in requests),
        "kv_bytes_peak": sum(request.kv_bytes_peak for request in requests),
        "kv_bytes_full": sum(request.kv_bytes_full for request in requests),
        "floored": any(request.floored for request in requests),
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, created: int) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_body(rid: str, model: str, requests: list, created: int, decode, prompt_text: str = "") -> dict:
    """A whole completion, a choice per engine request; ``decode(id) -> str`` names tokens, ``prompt_text``
    comes first with ``echo``."""
    choices = []
    for index, request in enumerate(requests):
        text = (prompt_text if request.echo else "") + request.text
        logprobs = completion_logprobs(request, decode) if request.logprobs is not None else None
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": request.finish_reason})
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    return {**body, "usage": usage(requests), "kvkeep": kv_report(requests)}


def completion_logprobs(request, decode) -> dict:
    """The completions API's ``logprobs``: each token, its log-probability, the likeliest alternatives and its
    character offset in the returned text; with ``echo`` the prompt's tokens come first (the first has none)."""
    entries = []
    if request.echo:
        entries.append((request.prompt_ids[0], None, None))
        entries += [(t, lp, top) for t, (lp, top) in zip(request.prompt_ids[1:], request.prompt_logprobs, strict=True)]
    entries += [(t, lp, top) for t, (lp, top) in zip(request.output_ids, request.output_logprobs, strict=True)]
    tokens = [decode(token) for token, _, _ in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0))
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [None if top is None else {decode(i): v for i, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


def chat_logprobs(request, decode) -> dict:
    """The chat API's ``logprobs``: per output token its text, log-probability, UTF-8 bytes and alternatives."""

    def entry(token: int, logprob: float) -> dict:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [
        {**entry(token, lp), "top_logprobs": [entry(i, v) for i, v in top]}
        for token, (lp, top) in zip(request.output_ids, request.output_logprobs, strict=True)
    ]
    return {"content": content, "refusal": None}


def chat_body(rid: str, model: str, requests: list, created: int, decode, prompt_text: str = "") -> dict:
    """A whole chat completion, a choice per engine request."""
    choices = []
    for index, request in enumerate(requests):
        message = {"role": "assistant", "content": request.text}
        logprobs = chat_logprobs(request, decode) if request.logprobs is not None else None
        finish = request.finish_reason
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    body = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices}
    return {**body, "usage": usage(requests), "kvkeep": kv_report(requests)}


def now() -> int:
    return int(time.time())
