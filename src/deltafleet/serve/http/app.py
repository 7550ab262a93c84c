"""The OpenAI-compatible HTTP API (FastAPI). It only translates: JSON <-> `Generation` / `Event` via a `Gateway`.

| method | path | who |
|---|---|---|
| POST | /v1/completions, /v1/chat/completions (stream: server-sent events ending with `[DONE]`) | any key |
| GET | /v1/models, /v1/models/{model} (the base plus the adapters the key may use) | any key |
| GET, POST | /v1/adapters (listing; load by name and path under the adapters root) | admin |
| DELETE | /v1/adapters/{name} | admin |
| GET | /metrics (Prometheus text) | admin |
| GET | /health | anyone |

The adapter is chosen by `model`; the base model's name means no adapter. An adapter the key may not use gets
the same 404 as one that does not exist. Without a tenancy config every request may do everything.
No torch here: the engine is behind `Gateway` (see `gateway.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import (
    AdapterConflict,
    Event,
    Gateway,
    GatewayError,
    Generation,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    ShuttingDown,
    Stream,
    UnknownModel,
)
from deltafleet.serve.http.metrics import Metrics
from deltafleet.serve.http.tenancy import Principal, Tenancy

log = logging.getLogger("deltafleet.serve")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def _not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist or you do not have access to it.",
                    "not_found_error", "model", "model_not_found")


def _from_gateway(e: GatewayError) -> ApiError:
    if isinstance(e, PromptTooLong):
        return ApiError(400, e.message, "invalid_request_error", e.param, "context_length_exceeded")
    if isinstance(e, InvalidRequest):
        return ApiError(400, e.message, "invalid_request_error", e.param, "invalid_value")
    if isinstance(e, UnknownModel):
        return ApiError(404, e.message, "not_found_error", e.param, "not_found")
    if isinstance(e, QueueFull):
        return ApiError(429, f"{e.message}; retry later", "rate_limit_error", None, "queue_full",
                        {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, ShuttingDown):
        return ApiError(503, e.message, "service_unavailable", None, "shutting_down",
                        {"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(e, AdapterConflict):
        return ApiError(409, e.message, "conflict_error", e.param, "conflict")
    return ApiError(500, e.message, "server_error")


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(P.error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """Closes its event generator however the response ends, so an abandoned request is aborted at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _endpoint_label(path: str) -> str:
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    known = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/metrics", "/health"}
    return path if path in known else "other"


class _CountResponses:
    """ASGI middleware: count responses by endpoint and status (without touching streaming)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(_endpoint_label(scope["path"]), message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(gateway: Gateway, tenancy: Tenancy | None = None, metrics: Metrics | None = None) -> FastAPI:
    tenancy = tenancy or Tenancy()
    metrics = metrics or Metrics()
    app = FastAPI(title="deltafleet", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway, app.state.tenancy, app.state.metrics = gateway, tenancy, metrics
    app.add_middleware(_CountResponses, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, e: GatewayError) -> JSONResponse:
        return _error_response(_from_gateway(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(e.detail), type_), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(P.error_body("internal server error", "server_error"), status_code=500)

    # ------------------------------------------------------------------ auth
    def principal(request: Request) -> Principal:
        p = tenancy.authenticate(request.headers.get("authorization"))
        if p is None:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return p

    def admin(request: Request) -> Principal:
        p = principal(request)
        if not p.admin:
            raise ApiError(403, "this endpoint needs an admin key", "permission_error", None, "admin_only")
        return p

    def adapter_for(p: Principal, model: str) -> str | None:
        if model == gateway.model_name:
            return None
        if p.may_use(model) and model in gateway.adapter_names():
            return model
        raise _not_found(model)

    # ------------------------------------------------------------------ generation
    def submit(gen: Generation, model: str, prompt_param: str) -> Stream:
        try:
            return gateway.submit(gen)
        except UnknownModel:  # removed between the check and the submission
            raise _not_found(model) from None
        except PromptTooLong as e:
            e.param = prompt_param
            raise

    async def observed(stream: Stream, t0: float) -> AsyncIterator[Event]:
        """The stream's events, timing the first token and the gaps between tokens."""
        seen, last = 0, t0
        async for ev in stream:
            if ev.completion_tokens > seen:
                now = time.perf_counter()
                (metrics.ttft if seen == 0 else metrics.itl).observe(now - last)
                seen, last = ev.completion_tokens, now
            yield ev

    def failure(ev: Event) -> ApiError:
        if ev.finish_reason == "abort":
            return ApiError(503, "the request was aborted: the server shut down before it finished",
                            "service_unavailable", None, "aborted")
        return ApiError(500, f"the request could not run: {ev.error}", "server_error", None, "engine_error")

    async def respond(request: Request, gen: Generation, model: str, chat: bool, stream_mode: bool,
                      include_usage: bool, t0: float):
        stream = submit(gen, model, "messages" if chat else "prompt")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        events = observed(stream, t0)
        if stream_mode:
            body = _chat_sse(rid, model, created, events, stream, include_usage) if chat else \
                _completion_sse(rid, model, created, events, stream, include_usage)
            return _SSEResponse(body, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> tuple[str, Event]:
            parts, last = [], None
            async for ev in events:
                parts.append(ev.text)
                last = ev
            return "".join(parts), last

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left: free the slot now
                stream.abort()
                work.cancel()
        if not work.done() or work.cancelled():
            return JSONResponse(P.error_body("client disconnected", "invalid_request_error"), status_code=499)
        text, last = work.result()
        if last.finish_reason in ("abort", "error"):
            raise failure(last)
        build = P.chat_completion if chat else P.completion
        return JSONResponse(build(rid, model, created, text, last.finish_reason, last.prompt_tokens,
                                  last.completion_tokens))

    def error_event(ev: Event) -> str:
        e = failure(ev)
        return _sse(P.error_body(e.message, e.type, e.param, e.code))

    async def _completion_sse(rid, model, created, events, stream: Stream, include_usage: bool):
        last = None
        try:
            async for ev in events:
                if ev.finish_reason in ("abort", "error"):
                    yield error_event(ev)
                    break
                last = ev
                if ev.text or ev.finish_reason:
                    yield _sse(P.completion_chunk(rid, model, created, ev.text, ev.finish_reason))
            if include_usage and last is not None:
                yield _sse(P.usage_chunk(rid, model, created, "text_completion", last.prompt_tokens,
                                         last.completion_tokens))
            yield _sse("[DONE]")
        finally:
            stream.abort()  # a no-op once finished

    async def _chat_sse(rid, model, created, events, stream: Stream, include_usage: bool):
        last = None
        try:
            yield _sse(P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
            async for ev in events:
                if ev.finish_reason in ("abort", "error"):
                    yield error_event(ev)
                    break
                last = ev
                if ev.text:
                    yield _sse(P.chat_chunk(rid, model, created, {"content": ev.text}, None))
                if ev.finish_reason:
                    yield _sse(P.chat_chunk(rid, model, created, {}, ev.finish_reason))
            if include_usage and last is not None:
                yield _sse(P.usage_chunk(rid, model, created, "chat.completion.chunk", last.prompt_tokens,
                                         last.completion_tokens))
            yield _sse("[DONE]")
        finally:
            stream.abort()

    def sampling(req: P._Sampling, prompt_ids: list[int], max_tokens: int, adapter: str | None) -> Generation:
        return Generation(prompt_ids=prompt_ids, max_tokens=max_tokens, adapter=adapter,
                          temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                          seed=req.seed, stop=req.stop_strings(), ignore_eos=req.ignore_eos)

    def stream_flags(req: P._Sampling) -> tuple[bool, bool]:
        return bool(req.stream), bool(req.stream and req.stream_options and req.stream_options.include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        p = principal(request)
        req = P.parse(P.CompletionRequest, await request.body())
        req.refuse_unsupported()
        adapter = adapter_for(p, req.model)
        prompt = req.single_prompt()
        ids = list(prompt) if isinstance(prompt, list) else gateway.encode(prompt)
        if not ids:
            raise InvalidRequest("prompt: encodes to no tokens", "prompt")
        gen = sampling(req, ids, req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, adapter)
        return await respond(request, gen, req.model, False, *stream_flags(req), t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        p = principal(request)
        req = P.parse(P.ChatCompletionRequest, await request.body())
        req.refuse_unsupported()
        adapter = adapter_for(p, req.model)
        ids = gateway.chat_prompt([m.for_template() for m in req.messages])
        max_tokens = req.max_completion_tokens or req.max_tokens or gateway.max_model_len - len(ids)
        if max_tokens < 1:
            raise PromptTooLong(f"messages: a prompt of {len(ids)} tokens leaves no room to answer in the context "
                                f"length {gateway.max_model_len}", "messages")
        gen = sampling(req, ids, max_tokens, adapter)
        return await respond(request, gen, req.model, True, *stream_flags(req), t0)

    # ------------------------------------------------------------------ models
    @app.get("/v1/models")
    async def list_models(request: Request):
        p = principal(request)
        data = [P.model_card(gateway.model_name, "deltafleet")]
        data += [P.model_card(n, "deltafleet", gateway.model_name) for n in gateway.adapter_names() if p.may_use(n)]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        p = principal(request)
        adapter = adapter_for(p, model)
        return P.model_card(model, "deltafleet", None if adapter is None else gateway.model_name)

    # ------------------------------------------------------------------ adapter lifecycle (admin)
    def adapter_json(a) -> dict:
        return {"id": a.name, "object": "adapter", "state": a.state, "kind": a.kind, "rank_or_variant": a.detail,
                "bytes": a.bytes, "error": a.error}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        admin(request)
        return {"object": "list", "data": [adapter_json(a) for a in gateway.adapters()]}

    @app.post("/v1/adapters", status_code=202)
    async def load_adapter(request: Request):
        admin(request)
        req = P.parse(P.LoadAdapterRequest, await request.body())
        info = gateway.load_adapter(req.name, req.path if req.path is not None else req.name)
        return JSONResponse(adapter_json(info), status_code=202)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        admin(request)
        try:
            gateway.unload_adapter(name)
        except UnknownModel:
            raise ApiError(404, f"adapter {name!r} not found", "not_found_error", "name", "adapter_not_found") from None
        return {"id": name, "object": "adapter", "deleted": True}

    # ------------------------------------------------------------------ operations
    @app.get("/health")
    async def health():
        if gateway.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint(request: Request):
        if not tenancy.open:
            admin(request)
        return PlainTextResponse(metrics.render(gateway.stats()), media_type="text/plain; version=0.0.4")

    return app
