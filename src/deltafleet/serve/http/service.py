"""The service layer of the OpenAI-compatible API: what happens between a parsed request and its response.

Plain classes and functions, no FastAPI (routes in `routes/` only read HTTP requests, call these, and wrap
the results in responses), so each piece is testable on its own:

- `ApiError`, `ERRORS`, `api_error`: a gateway error becomes an OpenAI error (status, type, code, headers)
  by its class, through one table;
- `Service`: who is calling (tenancy), which adapter a model name means, generation requests built, submitted
  and collected, model and adapter listings;
- `completion_sse`, `chat_sse`: server-sent-event framing of a request's events, ending with `data: [DONE]`.

Tokenization and chat templating run on a worker thread (`asyncio.to_thread`), so a long prompt never holds up
the event loop and the other requests on it. `REQUEST_ID` holds the id of the HTTP request being served (set by
`middleware.RequestIds`); errors that clients see without details are logged with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextvars import ContextVar
from dataclasses import dataclass

from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import (
    AdapterConflict,
    AdapterInfo,
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

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
RETRY_AFTER_SECONDS = 1
REQUEST_ID: ContextVar[str] = ContextVar("deltafleet_request_id", default="-")
log = logging.getLogger("deltafleet.serve")


# ---------------------------------------------------------------------- errors
class ApiError(Exception):
    """An error response: HTTP status, OpenAI error body (message, type, param, code) and extra headers."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return P.error_body(self.message, self.type, self.param, self.code)


@dataclass(frozen=True)
class ErrorSpec:
    """How a gateway error class reads over HTTP."""

    status: int
    type: str
    code: str | None
    param: bool = True  # report the error's `param`
    retry_after: bool = False  # a temporary refusal: send Retry-After
    hint: str = ""  # appended to the message


ERRORS: dict[type[GatewayError], ErrorSpec] = {  # the most specific class in the error's MRO wins
    InvalidRequest: ErrorSpec(400, "invalid_request_error", "invalid_value"),
    PromptTooLong: ErrorSpec(400, "invalid_request_error", "context_length_exceeded"),
    UnknownModel: ErrorSpec(404, "not_found_error", "not_found"),
    AdapterConflict: ErrorSpec(409, "conflict_error", "conflict"),
    QueueFull: ErrorSpec(429, "rate_limit_error", "queue_full", param=False, retry_after=True, hint="; retry later"),
    ShuttingDown: ErrorSpec(503, "service_unavailable", "shutting_down", param=False, retry_after=True),
    GatewayError: ErrorSpec(500, "server_error", None, param=False),
}


def api_error(e: GatewayError) -> ApiError:
    spec = next(ERRORS[c] for c in type(e).__mro__ if c in ERRORS)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if spec.retry_after else None
    return ApiError(spec.status, e.message + spec.hint, spec.type, e.param if spec.param else None, spec.code,
                    headers)


def not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist or you do not have access to it.",
                    "not_found_error", "model", "model_not_found")


def client_disconnected() -> ApiError:
    return ApiError(499, "client disconnected", "invalid_request_error")


def failure(ev: Event) -> ApiError:
    """The error of a request that ended with finish reason "abort" or "error". The engine's reason for an error
    (file paths, exception text) is logged with the request id, never sent."""
    if ev.finish_reason == "abort":
        return ApiError(503, "the request was aborted: the server shut down before it finished",
                        "service_unavailable", None, "aborted")
    rid = REQUEST_ID.get()
    log.error("request %s could not run: %s", rid, ev.error)
    return ApiError(500, f"the request could not run (request id {rid}); the server log has the details",
                    "server_error", None, "engine_error")


def failed(ev: Event) -> bool:
    return ev.finish_reason in ("abort", "error")


# ---------------------------------------------------------------------- server-sent events
def sse(obj: dict | str) -> str:
    """One server-sent event: a JSON object in compact form, or a bare string such as `[DONE]`."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass
class Submitted:
    """A submitted generation as its client sees it: response id, model name, creation time, and its events."""

    id: str
    model: str
    created: int
    chat: bool
    stream: Stream
    events: AsyncIterator[Event]  # the stream's events (timed for the metrics by `Service`)


async def completion_sse(sub: Submitted, include_usage: bool) -> AsyncIterator[str]:
    """/v1/completions chunks: one per piece of text (the last carries finish_reason), [usage], [DONE]. A failed
    request ends with an error event, then [DONE]. Closing the generator aborts the request."""
    last = None
    try:
        async for ev in sub.events:
            if failed(ev):
                yield sse(failure(ev).body())
                break
            last = ev
            if ev.text or ev.finish_reason:
                yield sse(P.completion_chunk(sub.id, sub.model, sub.created, ev.text, ev.finish_reason))
        if include_usage and last is not None:
            yield sse(P.usage_chunk(sub.id, sub.model, sub.created, "text_completion", last.prompt_tokens,
                                    last.completion_tokens))
        yield sse("[DONE]")
    finally:
        sub.stream.abort()  # a no-op once finished


async def chat_sse(sub: Submitted, include_usage: bool) -> AsyncIterator[str]:
    """/v1/chat/completions chunks: the assistant role, a content delta per piece of text, an empty delta with
    finish_reason, [usage], [DONE]. A failed request ends with an error event, then [DONE]."""
    last = None
    try:
        yield sse(P.chat_chunk(sub.id, sub.model, sub.created, {"role": "assistant", "content": ""}, None))
        async for ev in sub.events:
            if failed(ev):
                yield sse(failure(ev).body())
                break
            last = ev
            if ev.text:
                yield sse(P.chat_chunk(sub.id, sub.model, sub.created, {"content": ev.text}, None))
            if ev.finish_reason:
                yield sse(P.chat_chunk(sub.id, sub.model, sub.created, {}, ev.finish_reason))
        if include_usage and last is not None:
            yield sse(P.usage_chunk(sub.id, sub.model, sub.created, "chat.completion.chunk", last.prompt_tokens,
                                    last.completion_tokens))
        yield sse("[DONE]")
    finally:
        sub.stream.abort()


def stream_flags(req: P._Sampling) -> tuple[bool, bool]:
    """(stream the answer, end the stream with a usage chunk)."""
    return bool(req.stream), bool(req.stream and req.stream_options and req.stream_options.include_usage)


# ---------------------------------------------------------------------- the service
class Service:
    """The API's operations over a `Gateway`, for callers identified by their Authorization header."""

    def __init__(self, gateway: Gateway, tenancy: Tenancy, metrics: Metrics):
        self.gateway, self.tenancy, self.metrics = gateway, tenancy, metrics

    # ------------------------------------------------------------------ auth
    def principal(self, authorization: str | None) -> Principal:
        p = self.tenancy.authenticate(authorization)
        if p is None:
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return p

    def admin(self, authorization: str | None) -> Principal:
        p = self.principal(authorization)
        if not p.admin:
            raise ApiError(403, "this endpoint needs an admin key", "permission_error", None, "admin_only")
        return p

    def adapter_for(self, p: Principal, model: str) -> str | None:
        """The adapter `model` names (None: the base model); one the caller may not use is as missing (404)."""
        if model == self.gateway.model_name:
            return None
        if p.may_use(model) and model in self.gateway.adapter_names():
            return model
        raise not_found(model)

    # ------------------------------------------------------------------ generation
    async def completion(self, p: Principal, req: P.CompletionRequest, t0: float) -> Submitted:
        req.refuse_unsupported()
        adapter = self.adapter_for(p, req.model)
        prompt = req.single_prompt()
        ids = list(prompt) if isinstance(prompt, list) else await asyncio.to_thread(self.gateway.encode, prompt)
        if not ids:
            raise InvalidRequest("prompt: encodes to no tokens", "prompt")
        gen = _generation(req, ids, req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, adapter)
        return await self._submit(gen, req.model, False, t0)

    async def chat_completion(self, p: Principal, req: P.ChatCompletionRequest, t0: float) -> Submitted:
        req.refuse_unsupported()
        adapter = self.adapter_for(p, req.model)
        ids = await asyncio.to_thread(self.gateway.chat_prompt, [m.for_template() for m in req.messages])
        max_len = self.gateway.max_model_len
        max_tokens = req.max_completion_tokens or req.max_tokens or max_len - len(ids)
        if max_tokens < 1:
            raise PromptTooLong(f"messages: a prompt of {len(ids)} tokens leaves no room to answer in the context "
                                f"length {max_len}", "messages")
        return await self._submit(_generation(req, ids, max_tokens, adapter), req.model, True, t0)

    async def _submit(self, gen: Generation, model: str, chat: bool, t0: float) -> Submitted:
        try:
            stream = self.gateway.submit(gen)
            await stream.start()
        except UnknownModel:  # removed between the check and the submission
            raise not_found(model) from None
        except PromptTooLong as e:
            e.param = "messages" if chat else "prompt"
            raise
        self.metrics.request(model, stream.replica)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return Submitted(rid, model, int(time.time()), chat, stream, self._observed(stream, model, t0))

    async def _observed(self, stream: Stream, model: str, t0: float) -> AsyncIterator[Event]:
        """The stream's events, timing the first token and the gaps between tokens, counting tokens per model."""
        seen, last, replica = 0, t0, stream.replica
        async for ev in stream:
            if ev.completion_tokens > seen:
                now = time.perf_counter()
                if seen == 0:
                    self.metrics.first_token(now - last, replica)
                else:
                    self.metrics.next_token(now - last, replica)
                self.metrics.tokens(model, ev.completion_tokens - seen, replica)
                seen, last = ev.completion_tokens, now
            yield ev

    def sse(self, sub: Submitted, include_usage: bool) -> AsyncIterator[str]:
        return (chat_sse if sub.chat else completion_sse)(sub, include_usage)

    async def collect(self, sub: Submitted, disconnected: Awaitable[None]) -> dict:
        """The whole answer's JSON. If `disconnected` completes first, the request is aborted at once (its slot
        freed) and `client_disconnected()` is raised."""

        async def gather() -> tuple[str, Event]:
            parts, last = [], None
            async for ev in sub.events:
                parts.append(ev.text)
                last = ev
            return "".join(parts), last

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(disconnected)
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left: free the slot now
                sub.stream.abort()
                work.cancel()
        if not work.done() or work.cancelled():
            raise client_disconnected()
        text, last = work.result()
        if failed(last):
            raise failure(last)
        build = P.chat_completion if sub.chat else P.completion
        return build(sub.id, sub.model, sub.created, text, last.finish_reason, last.prompt_tokens,
                     last.completion_tokens)

    # ------------------------------------------------------------------ models
    def models(self, p: Principal) -> dict:
        g = self.gateway
        data = [P.model_card(g.model_name, "deltafleet")]
        data += [P.model_card(n, "deltafleet", g.model_name) for n in g.adapter_names() if p.may_use(n)]
        return {"object": "list", "data": data}

    def model(self, p: Principal, model: str) -> dict:
        adapter = self.adapter_for(p, P.check_name(model, "model"))
        return P.model_card(model, "deltafleet", None if adapter is None else self.gateway.model_name)

    # ------------------------------------------------------------------ adapter lifecycle (admin)
    # Gateway calls run on a worker thread: a load checks files, and a clustered gateway asks its replicas.
    async def adapters(self) -> dict:
        return {"object": "list", "data": [adapter_json(a) for a in await asyncio.to_thread(self.gateway.adapters)]}

    async def load_adapter(self, req: P.LoadAdapterRequest) -> dict:
        path = req.path if req.path is not None else req.name
        return adapter_json(await asyncio.to_thread(self.gateway.load_adapter, req.name, path))

    async def replace_adapter(self, name: str, req: P.ReplaceAdapterRequest) -> dict:
        """The new weights are read and checked first (a load can take seconds)."""
        P.check_name(name, "name")
        try:
            info = await asyncio.to_thread(self.gateway.replace_adapter, name,
                                           req.path if req.path is not None else name)
        except UnknownModel:
            raise ApiError(404, f"adapter {name!r} not found", "not_found_error", "name", "adapter_not_found") from None
        return adapter_json(info)

    async def unload_adapter(self, name: str) -> dict:
        P.check_name(name, "name")
        try:
            await asyncio.to_thread(self.gateway.unload_adapter, name)
        except UnknownModel:
            raise ApiError(404, f"adapter {name!r} not found", "not_found_error", "name", "adapter_not_found") from None
        return {"id": name, "object": "adapter", "deleted": True}

    # ------------------------------------------------------------------ operations
    async def metrics_text(self, authorization: str | None) -> str:
        """Prometheus text; admin-only when the server has tenants."""
        if not self.tenancy.open:
            self.admin(authorization)
        return self.metrics.render(await asyncio.to_thread(self.gateway.replica_stats))


def _generation(req: P._Sampling, prompt_ids: list[int], max_tokens: int, adapter: str | None) -> Generation:
    return Generation(prompt_ids=prompt_ids, max_tokens=max_tokens, adapter=adapter,
                      temperature=1.0 if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                      seed=req.seed, stop=req.stop_strings(), ignore_eos=req.ignore_eos)


def adapter_json(a: AdapterInfo) -> dict:
    return {"id": a.name, "object": "adapter", "state": str(a.state), "kind": a.kind, "rank_or_variant": a.detail,
            "bytes": a.bytes, "error": a.error, **a.extra}
