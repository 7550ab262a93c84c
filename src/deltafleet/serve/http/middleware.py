"""ASGI middleware of the HTTP API (plain ASGI, so streaming responses pass through untouched).

From the outside in (`create_app` adds them in the reverse order):
- `CountResponses`: counts responses by endpoint and status for /metrics;
- `RequestIds`: gives every request an id, sent back as `x-request-id` on every response and readable through
  `service.request_id()` while the request runs; an exception nothing else handled is logged with the id and
  answered 500 with a generic message that carries the id (never the exception's text or a server path);
- `BodyLimit`: a body over `max_body_bytes` gets 413 before it is read in full: at once when Content-Length says
  so, else as soon as the bytes received pass the limit (chunked bodies), so no request buffers more than the
  limit plus one chunk.
"""

from __future__ import annotations

import logging
import uuid

from starlette.responses import JSONResponse

from deltafleet.serve.http.metrics import Metrics
from deltafleet.serve.http.service import REQUEST_ID, ApiError

log = logging.getLogger("deltafleet.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
KNOWN_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/metrics",
                             "/health", "/openapi.json"})


def endpoint_label(path: str) -> str:
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in KNOWN_ENDPOINTS else "other"


class CountResponses:
    """Count responses by endpoint and status (without touching streaming)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(endpoint_label(scope["path"]), message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, f"internal server error (request id {request_id}); the server log has the details",
                    "server_error", None, "internal_error")


class RequestIds:
    """A fresh id per request (`x-request-id`); unexpected exceptions logged with it and answered with a generic
    500. An id a client sends is not reused: ids in the log are always the server's own."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex
        token = REQUEST_ID.set(rid)
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s %s failed", rid, scope.get("method"), endpoint_label(scope["path"]))
            if started:  # too late for an error response: let the server close the connection
                raise
            e = internal_error(rid)
            await JSONResponse(e.body(), status_code=e.status)(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body too large: the limit is {limit} bytes", "invalid_request_error", None,
                    "request_too_large", {"Connection": "close"})  # the rest of the body is never read


class BodyLimit:
    """413 for a body over `limit` bytes, before it is read in full."""

    def __init__(self, app, limit: int = DEFAULT_MAX_BODY_BYTES):
        if limit < 1:
            raise ValueError(f"max_body_bytes={limit}: must be >= 1")
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            e = body_too_large(self.limit)
            return await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise body_too_large(self.limit)  # the app's ApiError handler answers 413
            return message

        await self.app(scope, limited_receive, send)
