"""The OpenAI wire format kvkeep speaks: request bodies (validated) and response / stream-chunk bodies.

Requests may carry a ``kvkeep`` object (``extra_body={"kvkeep": {...}}`` in the ``openai`` client) with the
request's own KV ``budget``, prompt-scoring options (``observe``, ``pool``, ``floor``: see
:class:`kvkeep.policies.ScoringPolicy`) and ``ignore_eos`` (benchmarks with fixed output lengths); any other
key there is an error.  Every response reports the KV bytes its request held at the end (``kvkeep.kv_bytes``),
the most it held (``kv_bytes_peak``), what full attention would hold (``kv_bytes_full``) and whether the
policy's floor set its budget (``floored``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

KVKEEP_KEYS = ("budget", "observe", "pool", "floor", "ignore_eos")
POLICY_KEYS = ("observe", "pool", "floor")


class StreamOptions(BaseModel):
    include_usage: bool = False


class KVKeepOptions(BaseModel):
    """kvkeep's own request options."""

    model_config = ConfigDict(extra="forbid")
    budget: float | int | None = None
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
    model: str
    max_tokens: int | None = None
    temperature: float = Field(default=1.0)
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    kvkeep: KVKeepOptions | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value):
        if value is not None and value < 1:
            raise ValueError("max_tokens must be >= 1")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        if not 0 <= value <= 2:
            raise ValueError("temperature must be in [0, 2]")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value):
        if not 0 < value <= 1:
            raise ValueError("top_p must be in (0, 1]")
        return value

    @field_validator("n")
    @classmethod
    def _one(cls, value):
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("stop takes at most 4 strings")
        return stops


class CompletionRequest(_Sampled):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Sampled):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None

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


def usage(request) -> dict:
    completion = len(request.output_ids)
    return {
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": request.prompt_tokens + completion,
    }


def kv_report(request) -> dict:
    return {
        "kv_bytes": request.kv_bytes,
        "kv_bytes_peak": request.kv_bytes_peak,
        "kv_bytes_full": request.kv_bytes_full,
        "floored": request.floored,
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, created: int) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_body(rid: str, model: str, request, created: int) -> dict:
    body = completion_chunk(rid, model, request.text, request.finish_reason, created)
    return {**body, "usage": usage(request), "kvkeep": kv_report(request)}


def chat_body(rid: str, model: str, request, created: int) -> dict:
    message = {"role": "assistant", "content": request.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": request.finish_reason}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(request),
        "kvkeep": kv_report(request),
    }


def now() -> int:
    return int(time.time())
