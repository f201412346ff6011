"""The OpenAI-compatible HTTP layer over the engine (FastAPI).

``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template), ``GET /v1/models`` and
``GET /health``.  Responses stream as server-sent events with ``"stream": true``.  Every error is an
OpenAI-style JSON body with a 4xx status (5xx only for a fault of the server itself), never a traceback, and
the server keeps serving.  A client that goes away mid-stream cancels its request: the engine frees its row
at its next step.
"""

from __future__ import annotations

import asyncio
import json
import random

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import Engine, EngineStopped, QueueFull, Request
from ..sampling import Sampling
from . import protocol as wire


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def create_app(engine: Engine, tokenizer, model_name: str, stop_ids: set[int]) -> FastAPI:
    """The app serving ``engine`` under ``model_name`` (the engine's thread must be running)."""
    app = FastAPI(title="kvkeep", description="OpenAI-compatible server with KV-cache eviction")

    @app.exception_handler(APIError)
    async def _api_error(_, err: APIError):
        return JSONResponse(wire.error_body(err.message, err.kind, code=err.code), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return JSONResponse(wire.error_body("the request body is not valid JSON"), 400)
        if first.get("type") == "extra_forbidden" and "kvkeep" in where:
            message = f"unknown kvkeep parameter {where.split('.')[-1]!r}: use {' or '.join(wire.KVKEEP_KEYS)}"
        return JSONResponse(wire.error_body(f"{where}: {message}" if where else message, param=where or None), 400)

    @app.exception_handler(HTTPException)
    async def _http(_, err: HTTPException):
        return JSONResponse(wire.error_body(str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _fault(_, err: Exception):
        return JSONResponse(wire.error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), 500)

    @app.get("/health")
    async def health():
        stats = engine.stats()
        if stats["failure"]:
            return JSONResponse({"status": "error", **stats}, status_code=503)
        return {"status": "ok", **stats}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": wire.now(), "owned_by": "kvkeep"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: wire.CompletionRequest, http: HTTPRequest):
        check_model(body.model, model_name)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "give one prompt per request (batching is the server's job)", code="prompt")
            prompt = prompt[0]
        ids = list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        return await serve(body, ids, body.max_tokens or 16, chat=False, http=http)

    @app.post("/v1/chat/completions")
    async def chat(body: wire.ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model, model_name)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"model {model_name} has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
        limit = body.max_completion_tokens or body.max_tokens or engine.max_tokens
        return await serve(body, ids, limit, chat=True, http=http)

    async def serve(body, prompt_ids: list[int], max_tokens: int, chat: bool, http: HTTPRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        options = body.kvkeep or wire.KVKeepOptions()
        try:
            sampling = Sampling(
                body.temperature, body.top_p, random.randrange(1 << 31) if body.seed is None else body.seed
            )
            request = Request(
                prompt_ids, max_tokens, sampling, stop=body.stops, stop_ids=set() if options.ignore_eos else stop_ids,
                budget=options.budget, policy_options=options.policy_options(),
                on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            )  # fmt: skip
            engine.submit(request)
        except QueueFull as err:
            raise APIError(503, str(err), "server_overloaded", "queue_full") from None
        except EngineStopped as err:
            raise APIError(503, str(err), "server_error", "engine_stopped") from None
        except ValueError as err:
            raise APIError(400, " ".join(str(err).split())) from None
        rid, created = wire.new_id("chatcmpl" if chat else "cmpl"), wire.now()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(engine, request, events, rid, created, model_name, chat, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            while not request.finished:
                await events.get()
        finally:
            if not request.finished:  # the client went away
                engine.cancel(request)
        if request.finish_reason == "error":
            raise APIError(500, f"the request failed: {request.error}", "server_error")
        build = wire.chat_body if chat else wire.completion_body
        return build(rid, model_name, request, created)

    return app


def check_model(asked: str, served: str) -> None:
    if asked != served:
        raise APIError(
            404, f"the model {asked!r} does not exist: this server serves {served!r}", code="model_not_found"
        )


async def _stream(engine, request, events, rid, created, model, chat: bool, include_usage: bool):
    """The server-sent events of one request; a client that disconnects cancels it."""

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield sse(wire.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, created))
        while True:
            event = await events.get()
            if event.text or event.finish_reason:
                finish = event.finish_reason
                if chat:
                    yield sse(
                        wire.chat_chunk(rid, model, {"content": event.text} if event.text else {}, finish, created)
                    )
                else:
                    yield sse(wire.completion_chunk(rid, model, event.text, finish, created))
            if event.finish_reason:
                break
        if include_usage:
            kind = "chat.completion.chunk" if chat else "text_completion"
            last = {"id": rid, "object": kind, "created": created, "model": model, "choices": []}
            yield sse({**last, "usage": wire.usage(request), "kvkeep": wire.kv_report(request)})
        yield "data: [DONE]\n\n"
    finally:
        if not request.finished:
            engine.cancel(request)
