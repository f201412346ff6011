"""The OpenAI-compatible HTTP layer over the engine (FastAPI).

``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's chat template), ``GET /v1/models`` and
``GET /health``.  Responses stream as server-sent events with ``"stream": true``.  Every error is an
OpenAI-style JSON body with a 4xx status (5xx only for a fault of the server itself), never a traceback, and
the server keeps serving.  A client that goes away cancels its request, streaming or not: the engine frees
its row at its next step.  Bodies over ``max_body_bytes`` get a 413 before they are read.
"""

from __future__ import annotations

import asyncio
import json
import random

from fastapi import APIRouter, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import Engine, EngineStopped, QueueFull, Request
from ..sampling import Sampling
from . import protocol as wire
from .prompts import Prompts
from .protocol import APIError

#: The default limit on a request body: a long chat of a 128k-token model fits many times over.
DEFAULT_BODY_BYTES = 8 << 20
#: How often a non-streaming request's handler checks that its client is still there (seconds).
DISCONNECT_POLL_S = 0.25


def create_app(engine: Engine, tokenizer, model_name: str, stop_ids: set[int], *,
               max_body_bytes: int = DEFAULT_BODY_BYTES) -> FastAPI:  # fmt: skip
    """The app serving ``engine`` under ``model_name`` (the engine's thread must be running)."""
    service = Service(engine, Prompts(tokenizer, engine.facts.vocab, engine.max_prompt), model_name, stop_ids)
    app = FastAPI(title="kvkeep", description="OpenAI-compatible server with KV-cache eviction")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.include_router(router)
    app.router.on_shutdown.append(service.prompts.close)
    return app


router = APIRouter()


def service_of(http: HTTPRequest) -> Service:
    """The :class:`Service` of the app that ``http`` came to."""
    return http.app.state.service


@router.get("/health")
async def health(http: HTTPRequest):
    stats = service_of(http).engine.stats()
    if stats["failure"]:
        return JSONResponse({"status": "error", **stats}, status_code=503)
    return {"status": "ok", **stats}


@router.get("/v1/models")
async def models(http: HTTPRequest):
    card = {"id": service_of(http).model_name, "object": "model", "created": wire.now(), "owned_by": "kvkeep"}
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: wire.CompletionRequest, http: HTTPRequest):
    service = service_of(http)
    service.check(body)
    ids = await service.prompts.completion(body.prompt)
    text = ""  # the prompt's text, echoed: as sent, or decoded from token ids
    if body.echo:
        first = body.prompt[0] if isinstance(body.prompt, list) and body.prompt else body.prompt
        text = first if isinstance(first, str) else service.prompts.tokenizer.decode(ids)
    logprobs = {"logprobs": body.logprobs, "echo": body.echo, "prompt_text": text}
    return await service.serve(body, ids, body.max_tokens or 16, chat=False, http=http, **logprobs)


@router.post("/v1/chat/completions")
async def chat(body: wire.ChatCompletionRequest, http: HTTPRequest):
    service = service_of(http)
    service.check(body)
    if not getattr(service.prompts.tokenizer, "chat_template", None):
        raise APIError(400, f"model {service.model_name} has no chat template: use /v1/completions")
    ids = await service.prompts.chat([m.template_message() for m in body.messages])
    limit = body.max_completion_tokens or body.max_tokens or service.engine.max_tokens
    try:
        top = body.top
    except ValueError as err:
        raise APIError(400, str(err), param="top_logprobs") from None
    return await service.serve(body, ids, limit, chat=True, http=http, logprobs=top)


class Service:
    """What the routes share (kept on ``app.state.service``): a request body to engine requests, and the
    engine's events to a response."""

    def __init__(self, engine: Engine, prompts: Prompts, model_name: str, stop_ids: set[int]):
        self.engine, self.prompts, self.model_name, self.stop_ids = engine, prompts, model_name, stop_ids

    def check(self, body) -> None:
        """A 404 for another model's name, a 400 naming a field kvkeep does not do."""
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves {self.model_name!r}",
                           code="model_not_found", param="model")  # fmt: skip
        if refused := wire.unsupported(body):
            raise APIError(400, refused[1], param=refused[0])

    def submit(self, body, prompt_ids: list[int], max_tokens: int, logprobs: int | None, echo: bool, seed: int,
               events: asyncio.Queue) -> Request:  # fmt: skip
        """The engine request of ``body`` with ``seed``, its events put on ``events`` (4xx/503 if it cannot run)."""
        loop = asyncio.get_running_loop()
        options = body.kvkeep or wire.KVKeepOptions()
        try:
            request = Request(
                prompt_ids, max_tokens, Sampling(body.temperature, body.top_p, seed), stop=body.stops,
                stop_ids=set() if options.ignore_eos else self.stop_ids, budget=options.budget,
                policy_options=options.policy_options(), logprobs=logprobs, echo=echo,
                on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            )  # fmt: skip
            self.engine.submit(request)
        except QueueFull as err:
            raise APIError(503, str(err), "server_overloaded", "queue_full") from None
        except EngineStopped as err:
            raise APIError(503, str(err), "server_error", "engine_stopped") from None
        except ValueError as err:
            raise APIError(400, " ".join(str(err).split())) from None
        return request

    async def serve(self, body, prompt_ids: list[int], max_tokens: int, chat: bool, http: HTTPRequest,
                    logprobs: int | None = None, echo: bool = False, prompt_text: str = ""):  # fmt: skip
        """Run ``body`` as ``n`` engine requests (choice ``i`` samples with seed ``seed + i``) and answer."""
        for field, asked in (("n", body.n > 1), ("echo", echo), ("logprobs", logprobs is not None)):
            if body.stream and asked:
                raise APIError(400, f"{field} with stream: true is not supported: leave one out", param=field)
        seed = random.randrange(1 << 31) if body.seed is None else body.seed
        events: asyncio.Queue = asyncio.Queue()
        requests: list[Request] = []
        try:
            for i in range(body.n):
                requests.append(self.submit(body, prompt_ids, max_tokens, logprobs, echo, seed + i, events))
        except APIError:
            for request in requests:
                self.engine.cancel(request)
            raise
        rid, created = wire.new_id("chatcmpl" if chat else "cmpl"), wire.now()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(self.engine, requests[0], events, rid, created, self.model_name, chat, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            while not all(request.finished for request in requests):
                try:
                    await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await http.is_disconnected():
                        break  # the client gave up: nobody will read the answer
        finally:
            for request in requests:
                if not request.finished:
                    self.engine.cancel(request)
        if failed := next((request for request in requests if request.finish_reason == "error"), None):
            raise APIError(500, f"the request failed: {failed.error}", "server_error")
        build = wire.chat_body if chat else wire.completion_body
        return build(rid, self.model_name, requests, created, self._decode, prompt_text)

    def _decode(self, token: int) -> str:
        return self.prompts.tokenizer.decode([token])


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        message = f"the request body is over this server's limit of {self.limit} bytes (--max-body-mib)"
        response = JSONResponse(wire.error_body(message, code="body_too_large"), status_code=413)
        await response(scope, receive, send)


async def _api_error(_, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def _invalid(http: HTTPRequest, err: RequestValidationError):
    errors = err.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(wire.error_body("the request body is not valid JSON"), 400)
    if tuple(first.get("loc", ())) == ("body",) and "json" not in http.headers.get("content-type", ""):
        message = "the request body must be a JSON object, sent with content-type: application/json"
        return JSONResponse(wire.error_body(message), 400)
    where, message = wire.field_error(first)
    if first.get("type") == "extra_forbidden" and where.startswith("kvkeep."):
        message = f"unknown kvkeep parameter {where.split('.')[-1]!r}: use {' or '.join(wire.KVKEEP_KEYS)}"
    return JSONResponse(wire.error_body(f"{where}: {message}" if where else message, param=where or None), 400)


async def _http(_, err: HTTPException):
    return JSONResponse(wire.error_body(str(err.detail)), status_code=err.status_code)


async def _fault(_, err: Exception):
    return JSONResponse(wire.error_body(f"internal error: {type(err).__name__}: {err}", "server_error"), 500)


#: Every error, as an OpenAI-style JSON body.
ERROR_HANDLERS = {APIError: _api_error, RequestValidationError: _invalid, HTTPException: _http, Exception: _fault}


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
            yield sse({**last, "usage": wire.usage([request]), "kvkeep": wire.kv_report([request])})
        yield "data: [DONE]\n\n"
    finally:
        if not request.finished:
            engine.cancel(request)
