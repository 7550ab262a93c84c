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

Layers (after vLLM's protocol / serving / router split): `protocol` (request and response shapes), `service`
(auth, submission, SSE framing, error translation; no FastAPI), `routes/` (the routers); this module assembles
them with the middleware and exception handlers. No torch here: the engine is behind `Gateway` (`gateway.py`).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import Gateway, GatewayError
from deltafleet.serve.http.metrics import Metrics
from deltafleet.serve.http.routes import admin, health, openai
from deltafleet.serve.http.service import ApiError, Service, api_error
from deltafleet.serve.http.tenancy import Tenancy

log = logging.getLogger("deltafleet.serve")


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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


async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return _error_response(e)


async def _gateway_error(_: Request, e: GatewayError) -> JSONResponse:
    return _error_response(api_error(e))


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(str(e.detail), type_), status_code=e.status_code)


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return JSONResponse(P.error_body("internal server error", "server_error"), status_code=500)


def create_app(gateway: Gateway, tenancy: Tenancy | None = None, metrics: Metrics | None = None) -> FastAPI:
    tenancy = tenancy or Tenancy()
    metrics = metrics or Metrics()
    app = FastAPI(title="deltafleet", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway, app.state.tenancy, app.state.metrics = gateway, tenancy, metrics
    app.state.service = Service(gateway, tenancy, metrics)
    app.add_middleware(_CountResponses, metrics=metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    for module in (openai, admin, health):
        app.include_router(module.router)
    return app
