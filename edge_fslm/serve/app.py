"""The ASGI app: OpenAI's routes over the registry and the scheduler, and the page at ``/``.

A thin shell. Requests are checked by :mod:`wire`, run by the :class:`Scheduler` on its
worker thread, and answered as JSON or as server-sent events in OpenAI's chunk format. Every
refusal is an OpenAI-style JSON error with a 4xx status; an unexpected failure is a 500 with a
one-line message (the traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import BudgetError, EdgeFSLMError, PromptError
from ..rss import current_rss
from . import wire
from .registry import Registry, UnknownModel
from .scheduler import PARALLEL_IDLE_SECONDS, Cancelled, Job, QueueFull, Scheduler, ShuttingDown

log = logging.getLogger("edge_fslm.serve")


@dataclass(frozen=True)
class ServeSettings:
    """How the server guards itself; the CLI's flags."""

    api_key: str | None = None
    max_body_bytes: int = wire.MAX_BODY_BYTES
    queue_size: int = 64
    parallel: int = 1
    parallel_idle: float = PARALLEL_IDLE_SECONDS
    grace_seconds: float = 30.0


def _error(exc: wire.WireError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _server_spelling(message: str) -> str:
    """The runtime's advice as a client of this server can act on it."""
    return (message.replace(", or pass truncate=True", "")
            .replace("raise ctx_size", "ask for a server with a larger --ctx-size"))


def _from_run_error(exc: BaseException) -> wire.WireError:
    """What a failed run tells the client: a 4xx for its own request's faults, else a 5xx."""
    if isinstance(exc, wire.WireError):
        return exc
    if isinstance(exc, UnknownModel):
        return wire.WireError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, PromptError):
        code = "context_length_exceeded" if "context" in str(exc) else "invalid_value"
        return wire.WireError(400, _server_spelling(str(exc)), param="messages", code=code)
    if isinstance(exc, QueueFull):
        return wire.WireError(429, str(exc), code="queue_full", type="rate_limit_error",
                              headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return wire.WireError(503, str(exc), code="shutting_down", type="server_error", headers={"Retry-After": "5"})
    if isinstance(exc, BudgetError):
        return wire.WireError(503, str(exc), code="insufficient_memory", type="server_error")
    if isinstance(exc, EdgeFSLMError):
        return wire.WireError(500, str(exc), code="stack_error", type="server_error")
    log.error("request failed", exc_info=exc)
    return wire.WireError(500, f"internal error ({type(exc).__name__}) — the server log has the details",
                          code="internal_error", type="server_error")


class Server:
    """State shared by the routes: the stacks, the worker, the settings."""

    def __init__(self, registry: Registry, settings: ServeSettings):
        self.registry = registry
        self.settings = settings
        self.scheduler = Scheduler(registry, queue_size=settings.queue_size, parallel=settings.parallel,
                                   parallel_idle=settings.parallel_idle)
        self.started = int(time.time())

    # -- guards ------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest takes constant time in the token's content; the lengths may differ
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise wire.WireError(401, "missing or wrong API key — send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> dict:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise wire.WireError(413, f"request body is {declared} bytes; the limit is {limit} (--max-body)",
                                 code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise wire.WireError(413, f"request body is over the limit of {limit} bytes (--max-body)",
                                     code="body_too_large")
            chunks.append(chunk)
        return wire.parse_json(b"".join(chunks))

    # -- routes ------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        html = resources.files("edge_fslm.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        c = self.registry.pool.counters
        failed = dict(self.registry.failed)
        return JSONResponse({
            # "degraded": the server answers, but some stack's last load failed (its requests get a 500)
            "status": "degraded" if failed else "ok",
            "stacks": self.registry.names,
            "failed_stacks": failed,
            "loaded_models": [p.rsplit("/", 1)[-1] for p in self.registry.pool.resident],
            "queue": {"waiting": s.waiting, "running": s.running, "size": s.queue_size, "parallel": s.parallel},
            "requests": {"completed": s.stats.completed, "failed": s.stats.failed, "cancelled": s.stats.cancelled,
                         "refused": s.stats.refused, "grouped": s.stats.grouped},
            # the multi-sequence context groups decode in: how often it was opened, how often a
            # stage's shared prefix was evaluated in it or reused (kept or restored) instead
            "parallel": {"groups": s.stats.groups, "contexts_open": s.parallel_contexts,
                         "context_opens": c.parallel_opens, "prefix_evals": c.parallel_prefix_evals,
                         "prefix_reuses": c.parallel_prefix_reuses,
                         # grouped requests whose client went away: their sequence left its slot mid-stage
                         "dropped": c.parallel_drops},
            "rss_bytes": current_rss(),
            "budget_bytes": self.registry.budget,
        })

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        desc = {n: st.manifest.description for n, st in self.registry.stacks.items()}
        return JSONResponse(wire.models_list(self.registry.names, desc, self.started))

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        self.authorize(request)
        body = await self.read_body(request)
        req = wire.chat_request(body) if chat else wire.completion_request(body)
        if req.model not in self.registry.stacks:
            raise _from_run_error(UnknownModel(
                f"model '{req.model}' is not served here — GET /v1/models lists: {', '.join(self.registry.names)}"))
        job = Job(stack=req.model, prompt=req.prompt, final=req.final, loop=asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except (QueueFull, ShuttingDown) as exc:
            raise _from_run_error(exc) from None
        rid = wire.new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        if not req.stream:
            return await self._collect(request, job, req, rid, created, chat)
        # wait for the first text before answering 200, so a prompt the context cannot hold
        # (found while stage 1 prepares) is still a 400, not an error inside a stream
        early: list[tuple[str, object]] = []
        while True:
            kind, payload = await self._next_event(request, job)
            if kind == "error":
                if isinstance(payload, Cancelled):
                    return Response(status_code=499)
                raise _from_run_error(payload)  # type: ignore[arg-type]
            early.append((kind, payload))
            if kind in ("text", "done"):
                break
        return StreamingResponse(self._events(job, req, rid, created, chat, early), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _next_event(self, request: Request, job: Job) -> tuple[str, object]:
        """The job's next event; cancels the job when the client goes away while we wait."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return "error", Cancelled()

    async def _collect(self, request: Request, job: Job, req: wire.StackRequest, rid: str, created: int,
                       chat: bool) -> Response:
        while True:
            kind, payload = await self._next_event(request, job)
            if kind == "done":
                build = wire.chat_completion if chat else wire.text_completion
                return JSONResponse(build(payload, model=req.model, id=rid, created=created))  # type: ignore[arg-type]
            if kind == "error":
                if isinstance(payload, Cancelled):
                    return Response(status_code=499)  # nobody is listening; the status is for the log
                raise _from_run_error(payload)  # type: ignore[arg-type]

    async def _events(self, job: Job, req: wire.StackRequest, rid: str, created: int, chat: bool,
                      early: list) -> AsyncIterator[bytes]:
        last_stage = list(self.registry.stacks[req.model].manifest.stages)[-1].name
        chunk = wire.chat_chunk if chat else wire.text_chunk
        meta = dict(id=rid, created=created, model=req.model)

        def content(text: str) -> dict:
            return chunk(**meta, delta={"content": text}) if chat else chunk(**meta, text=text)

        finished = False
        try:
            if chat:
                yield wire.sse(chunk(**meta, delta={"role": "assistant", "content": ""}))
            queued = list(early)
            while True:
                kind, payload = queued.pop(0) if queued else await job.events.get()
                if kind == "stage_start" and req.stream_stages:
                    yield wire.sse(chunk(**meta, choices=False, fslm={"event": "stage_start", "stage": payload}))
                elif kind == "text":
                    stage, piece = payload  # type: ignore[misc]
                    if req.stream_stages:
                        yield wire.sse(chunk(**meta, choices=False,
                                             fslm={"event": "stage_delta", "stage": stage, "text": piece}))
                    if stage == last_stage and piece:
                        yield wire.sse(content(piece))
                elif kind == "stage_end" and req.stream_stages:
                    yield wire.sse(chunk(**meta, choices=False,
                                         fslm={"event": "stage_end", "stage": payload["name"], "trace": payload}))
                elif kind == "done":
                    result = payload
                    reason = wire.finish_reason(result)  # type: ignore[arg-type]
                    trace = wire.trace(result)  # type: ignore[arg-type]
                    if req.include_usage:
                        yield wire.sse(chunk(**meta, finish=reason) if chat else chunk(**meta, finish=reason))
                        yield wire.sse(chunk(**meta, choices=False, usage=wire.usage(result), fslm=trace))  # type: ignore[arg-type]
                    else:
                        yield wire.sse(chunk(**meta, finish=reason, fslm=trace))
                    yield wire.sse("[DONE]")
                    finished = True
                    return
                elif kind == "error":
                    if not isinstance(payload, Cancelled):
                        yield wire.sse(_from_run_error(payload).body())  # type: ignore[arg-type]
                        yield wire.sse("[DONE]")
                    finished = True
                    return
        finally:
            if not finished:
                job.cancel()  # the client went away mid-stream: stop its generation now

    # -- lifetime ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.scheduler.start()
        try:
            yield
        finally:
            # uvicorn has already waited (up to the grace period) for the requests in flight
            await asyncio.to_thread(self.scheduler.stop, self.settings.grace_seconds)
            self.registry.close()


def create_app(registry: Registry, settings: ServeSettings | None = None) -> Starlette:
    """The ASGI app serving ``registry``'s stacks; run it with uvicorn (``edge-fslm serve`` does)."""
    server = Server(registry, settings or ServeSettings())

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except wire.WireError as exc:
                return _error(exc)
            except Exception as exc:  # never a traceback to the client
                return _error(_from_run_error(exc))
        return endpoint

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(wire.WireError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    routes = [
        Route("/", guarded(server.page), methods=["GET"]),
        Route("/health", guarded(server.health), methods=["GET"]),
        Route("/v1/models", guarded(server.models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(server.chat), methods=["POST"]),
        Route("/v1/completions", guarded(server.completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app
