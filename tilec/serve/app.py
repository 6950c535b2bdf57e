"""The HTTP side of `tilec serve`: a Starlette app with the OpenAI routes.

POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events, one
per token, or whole), GET /v1/models, /health, /metrics. Every answer that is not a
200 is the OpenAI error object: 400 for a request tilec refuses, 404 and 405 for a
wrong path or method, 413 for a body over MAX_BODY, 429 when the queue is full, 500 for
an engine fault (the requests in the engine's slots at that step), 503 while the
server cannot take requests. A fault after a stream has started is its last event,
`data: {"error": ...}` (the status line is sent already).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tilec.errors import RunError
from tilec.runtime.executors import entry_executor
from tilec.runtime.generate import DecodeSlots, make_slots
from tilec.serve import protocol
from tilec.serve.metrics import CONTENT_TYPE, Metrics
from tilec.serve.protocol import Answer, APIError, Context, Params
from tilec.serve.scheduler import Done, Failed, Job, QueueFull, Scheduler, Token, Unavailable
from tilec.serve.text import Codec

if TYPE_CHECKING:
    from tilec.api import Engine

MAX_BODY = 8 << 20
GONE = object()   # put on a request's event queue when its client disconnects


class Server:
    """One engine behind the OpenAI routes: its scheduler, metrics and app. An engine
    with a prefill entry (compiled from a decoder with `model.prefill`, on by default)
    takes prompts a chunk per launch of that entry, interleaved with the decode of
    running requests (runtime.generate.PrefillSlots); without one (or with
    `prefill=False`) a token per decode step. After an engine fault both executors
    are made anew."""

    def __init__(self, engine: Engine, backend: str = "auto", max_queue: int = 64,
                 prefill: bool = True):
        spec = engine.generation_spec
        if spec is None:
            raise RunError("tilec serve needs a decoder engine (compiled from model: "
                           "{family: ...} or {hf: ...})")
        if max_queue < 0:
            raise RunError(f"--max-queue must be >= 0, got {max_queue}")
        self.model = engine.data.manifest.model
        self.spec = spec
        self.ctx = Context(self.model, spec, Codec(engine.tokenizer(), engine.chat_template()))
        self.metrics = Metrics(DecodeSlots.count)
        chunked = prefill and "prefill" in engine.data.entries

        def slots() -> DecodeSlots:   # in the engine thread, as every engine call
            decode = engine.new_executor(backend)
            if not chunked:
                return make_slots(spec, decode, None, lambda: engine.new_executor(backend))
            # (a reset makes a new prefill executor on the new decode executor's pools)
            return make_slots(spec, decode, entry_executor(decode, "prefill"),
                              lambda: engine.new_executor(backend),
                              lambda new_decode: entry_executor(new_decode, "prefill"))

        self.scheduler = Scheduler(slots, max_queue, self.metrics)
        self._started = False
        self.app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.metrics_text, methods=["GET"])],
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
            lifespan=self._lifespan)

    def start(self) -> None:
        """Start the engine thread (makes the executor; a GPU kernel may compile)."""
        if not self._started:
            self.scheduler.start()
            self.metrics.slots = self.scheduler.slots.count
            self._started = True

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        await asyncio.to_thread(self.start)
        try:
            yield
        finally:   # the HTTP server has drained its requests
            await asyncio.to_thread(self.scheduler.stop)

    # ---- routes --------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", protocol.parse_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat", protocol.parse_chat)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": int(self.metrics.started),
            "owned_by": "tilec", "max_model_len": self.spec.max_seq_len}]})

    async def health(self, request: Request) -> Response:
        if self.scheduler.broken:
            return _error(APIError(503, self.scheduler.broken, "server_error", code="unavailable"))
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ---- generation ----------------------------------------------------------------------
    async def _generate(self, request: Request, endpoint: str, parse) -> Response:
        try:
            body = await _body(request)
            # parsing may encode a long prompt or render a chat: not on the event loop
            params: Params = await asyncio.to_thread(
                lambda: parse(protocol.parse_json(body), self.ctx))
        except APIError as e:
            self.metrics.request(endpoint, "invalid")
            return _error(e)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(params.prompt, params.max_tokens, params.sampling, self.spec.eos_token_ids,
                  self.ctx.codec.stream(params.stop),
                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            self.metrics.request(endpoint, "rejected")
            return _error(APIError(429, str(e), "rate_limit_error", code="queue_full"))
        except Unavailable as e:
            self.metrics.request(endpoint, "failed")
            return _error(APIError(503, str(e), "server_error", code="unavailable"))
        answer = Answer(endpoint, self.model)
        if params.stream:
            return StreamingResponse(self._stream(job, events, answer, params, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await self._whole(request, job, events, answer, params, endpoint)

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, answer: Answer,
                     params: Params, endpoint: str) -> Response:
        watcher = asyncio.create_task(_on_disconnect(request, lambda: events.put_nowait(GONE)))
        ids: list[int] = []
        text: list[str] = []
        answered = False
        try:
            while True:
                event = await events.get()
                if event is GONE:
                    self.metrics.request(endpoint, "cancelled")
                    return Response(status_code=499)   # nobody reads it
                answered = not isinstance(event, Token)
                if isinstance(event, Token):
                    ids.append(event.id)
                    text.append(event.text)
                elif isinstance(event, Done):
                    text.append(event.text)
                    self.metrics.request(endpoint, "finished")
                    return JSONResponse(answer.whole("".join(text), ids, event.finish_reason,
                                                     len(params.prompt)))
                else:
                    self.metrics.request(endpoint, "failed")
                    return _error(_failure(event))
        finally:
            watcher.cancel()
            if not answered:   # the client left, or this handler was cancelled
                self.scheduler.cancel(job)

    async def _stream(self, job: Job, events: asyncio.Queue, answer: Answer, params: Params,
                      endpoint: str) -> AsyncIterator[str]:
        """One event per token, then one with the finish reason (and the usage, if
        asked), then [DONE]. A client that leaves cancels its job (Starlette cancels
        this generator when it sees the disconnect)."""
        outcome = "cancelled"
        made = 0
        try:
            while True:
                event = await events.get()
                if isinstance(event, Token):
                    made += 1
                    yield _sse(answer.chunk(event.text, [event.id], role=made == 1))
                elif isinstance(event, Done):
                    yield _sse(answer.chunk(event.text, [], event.finish_reason, role=made == 0))
                    if params.include_usage:
                        yield _sse(answer.usage_chunk(len(params.prompt), made))
                    yield "data: [DONE]\n\n"
                    outcome = "finished"
                    return
                else:
                    yield _sse(_failure(event).body())
                    outcome = "failed"
                    return
        finally:
            if outcome == "cancelled":
                self.scheduler.cancel(job)
            self.metrics.request(endpoint, outcome)


def _failure(event: Failed) -> APIError:
    return APIError(event.status, event.message, "server_error",
                    code="engine_fault" if event.status == 500 else "unavailable")


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _body(request: Request) -> bytes:
    """The request body, refused past MAX_BODY bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _on_disconnect(request: Request, then) -> None:
    """Call `then` when the client disconnects (the body is read by now, so the next
    message the server gives is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    then()


def _error(e: APIError) -> Response:
    return JSONResponse(e.body(), status_code=e.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = {404: f"no route {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
        exc.status_code, str(exc.detail))
    return JSONResponse(protocol.error_body(message, type_), status_code=exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug in tilec: still the error object (the traceback goes to the log)."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return JSONResponse(protocol.error_body(
        f"internal error: {type(exc).__name__}: {first[:300]}", "server_error"), status_code=500)
