"""The HTTP side of `peftcli serve`: OpenAI's routes over the engine, Bearer auth, errors in OpenAI's
shape, and a health check.

    GET  /health                  200 while the server runs (no key needed: for load balancers)
    GET  /v1/models               the base and every adapter
    POST /v1/chat/completions     `model` picks the adapter; its chat template renders the messages
    POST /v1/completions          a raw prompt, fed as written

Every refusal is {"error": {"message", "type", "param", "code"}} with a 4xx status and the server
keeps serving; an unexpected failure of one request is a 500 of that request alone.
"""

from __future__ import annotations

import hmac
import logging
import random
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from peftcli.errors import UserError
from peftcli.evaluation.adapters import BASE
from peftcli.interruption import HANDLED
from peftcli.serve.engine import Engine, Reply, Stream
from peftcli.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_choice,
    envelope,
    new_id,
    parse,
    sse,
    text_choice,
    usage,
)

MAX_BODY_BYTES = 8 * 1024 * 1024  # far above any prompt a context holds; bounds what one request can make us read
GRACE_SECONDS = 30  # how long a stopping server waits for the requests in flight
log = logging.getLogger("peftcli.serve")


def create_app(engine: Engine, api_key: str | None, runs: dict[str, str]) -> FastAPI:
    """The app; `runs` maps each adapter to its run folder (shown in /v1/models)."""
    app = FastAPI(title="peftcli", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed: %s %s", request.method, request.url.path)
        error = ApiError(500, f"the server failed to answer: {exc.__class__.__name__}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    def model_card(name: str) -> dict:
        card: dict[str, Any] = {"id": name, "object": "model", "created": started, "owned_by": "peftcli"}
        root, parent = (engine.base_name, None) if name == BASE else (runs[name], BASE)
        return {**card, "root": root, "parent": parent}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in engine.models()]}

    @app.get("/v1/models/{name}", dependencies=guarded)
    async def model(name: str) -> dict:
        engine.adapter(name)  # a 404 for a model this server does not have
        return model_card(name)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        body = parse(await _read(request), ChatRequest)
        adapter = engine.adapter(body.model)
        turns = [message.as_turn() for message in body.messages]
        prompt, settings = await run_in_threadpool(
            _prepared, engine, adapter, body, lambda: engine.chat_prompt(adapter, turns)
        )
        ident = new_id("chatcmpl")
        if body.stream:
            chunk = _chunker("chat.completion.chunk", ident, body.model)
            first = chunk([chat_choice("", None, delta=True, first=True)])
            stream = engine.stream(adapter, prompt, settings)
            events = _events(
                stream,
                lambda text: chunk([chat_choice(text, None, delta=True)]),
                lambda reply: chunk([chat_choice(None, reply.finish_reason, delta=True)]),
                chunk if body.wants_usage() else None,
                first,
            )
            return EventStream(events, stream)
        reply = await run_in_threadpool(engine.answer, adapter, prompt, settings)
        choice = chat_choice(reply.text, reply.finish_reason, delta=False)
        return _whole(envelope("chat.completion", ident, body.model, [choice]), reply)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = parse(await _read(request), CompletionRequest)
        adapter = engine.adapter(body.model)
        text = body.text()
        prompt, settings = await run_in_threadpool(_prepared, engine, adapter, body, lambda: engine.text_prompt(text))
        ident = new_id("cmpl")
        if body.stream:
            chunk = _chunker("text_completion", ident, body.model)
            stream = engine.stream(adapter, prompt, settings)
            events = _events(
                stream,
                lambda piece: chunk([text_choice(piece, None)]),
                lambda reply: chunk([text_choice("", reply.finish_reason)]),
                chunk if body.wants_usage() else None,
            )
            return EventStream(events, stream)
        reply = await run_in_threadpool(engine.answer, adapter, prompt, settings)
        choice = text_choice(reply.text, reply.finish_reason)
        return _whole(envelope("text_completion", ident, body.model, [choice]), reply)

    return app


async def _read(request: Request) -> bytes:
    """The request body, refused past MAX_BODY_BYTES before it is all read."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _prepared(engine: Engine, adapter: str | None, body: ChatRequest | CompletionRequest, render) -> tuple:
    """The prompt and the settings of a request, checked against the context. Prompts are rendered and
    counted on the engine's turn: a fast tokenizer is not safe to use from two threads at once."""
    seed = body.seed if body.seed is not None else random.randrange(2**31)  # unseeded sampling differs per request
    options = {"temperature": body.temperature, "top_p": body.top_p, "seed": seed, "stop": body.stops()}
    with engine.turn():
        try:
            prompt = render()
        except TemplateError as exc:  # the template refuses these messages (roles out of order, ...)
            raise ApiError(400, f"the chat template refused the messages: {exc}", "messages", "invalid_value") from None
        return prompt, engine.settings(adapter, prompt, body.token_limit(), **options)


def _whole(response: dict, reply: Reply) -> JSONResponse:
    response["usage"] = usage(reply.prompt_tokens, reply.completion_tokens)
    return JSONResponse(response)


def _chunker(kind: str, ident: str, model: str):
    created = int(time.time())
    return lambda choices: envelope(kind, ident, model, choices, created)


class EventStream(StreamingResponse):
    """Server-sent events of a reply being generated; when the client hangs up (the next write
    fails, or the server notices the disconnect) generation is stopped at once, not when the
    abandoned iterator is garbage-collected."""

    def __init__(self, events: Iterator[str], stream: Stream):
        super().__init__(events, media_type="text/event-stream")
        self.stream = stream

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.stream.cancel()


def _events(stream: Stream, piece, last, usage_chunk, first: dict | None = None) -> Iterator[str]:
    """A reply as server-sent events: pieces, the finish reason, optionally the usage, then [DONE].
    A failure after the stream has begun can only be said in the stream: as an error event."""
    if first is not None:
        yield sse(first)
    try:
        for event in stream:
            if not isinstance(event, Reply):
                yield sse(piece(event))
                continue
            yield sse(last(event))
            if usage_chunk is not None:
                yield sse({**usage_chunk([]), "usage": usage(event.prompt_tokens, event.completion_tokens)})
    except Exception as exc:  # noqa: BLE001 - the status line is sent; the client reads this instead
        log.exception("streamed request failed")
        yield sse(ApiError(500, f"the server failed to answer: {exc.__class__.__name__}", kind="server_error").body())
        return
    yield sse("[DONE]")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads: a port in use fails at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})",
            hint="pick another --port, or stop what is using this one",
        ) from None
    return sock


def url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve_forever(app: FastAPI, sock: socket.socket, quiet: bool) -> int | None:
    """Serve until SIGTERM or Ctrl-C, then stop accepting, let the requests in flight finish (up to
    GRACE_SECONDS), and return the signal that stopped it (None: uvicorn stopped on its own). The
    caller exits 128 + that signal: a stopped server was interrupted, it did not finish a job."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning" if quiet else "info", lifespan="off", timeout_graceful_shutdown=GRACE_SECONDS
    )
    server = uvicorn.Server(config)
    # uvicorn handles SIGINT/SIGTERM itself while it runs (the graceful drain), then re-raises each
    # signal it caught, newest first, into the handler it found: this one records them instead of
    # raising Interruption in the middle of uvicorn's shutdown.
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum)) for signum in HANDLED}
    try:
        server.run(sockets=[sock])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return received[-1] if received else None  # re-raised newest first: the last is the one that stopped it
