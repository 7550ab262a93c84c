"""The OpenAI-compatible HTTP API (FastAPI). It only translates: JSON <-> `Generation` / `Event` via a `Gateway`.

| method | path | who |
|---|---|---|
| POST | /v1/completions, /v1/chat/completions (stream: server-sent events ending with `[DONE]`) | any key |
| GET | /v1/models, /v1/models/{model} (the base plus the adapters the key may use) | any key |
| GET, POST | /v1/adapters (listing; load by name and path under the adapters root) | admin |
| DELETE | /v1/adapters/{name} | admin |
| GET | /metrics (Prometheus text) | admin |
| GET | /health | anyone |
| GET | /openapi.json (the OpenAPI document) | anyone |

The adapter is chosen by `model`; the base model's name means no adapter. An adapter the key may not use gets
the same 404 as one that does not exist. Without a tenancy config every request may do everything. Every
response carries `x-request-id`; bodies over `max_body_bytes` get 413 (see `middleware`).

Layers (after vLLM's protocol / serving / router split): `protocol` (request and response shapes), `service`
(auth, submission, SSE framing, error translation; no FastAPI), `routes/` (the routers), `middleware` (request
ids, the body limit, response counts), `openapi` (the document); this module assembles them with the exception
handlers. No torch here: the engine is behind `Gateway` (`gateway.py`).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltafleet.serve.http import openapi
from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import Gateway, GatewayError
from deltafleet.serve.http.metrics import Metrics
from deltafleet.serve.http.middleware import DEFAULT_MAX_BODY_BYTES, BodyLimit, CountResponses, RequestIds
from deltafleet.serve.http.routes import admin, health, openai
from deltafleet.serve.http.service import ApiError, Service, api_error
from deltafleet.serve.http.tenancy import Tenancy


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return _error_response(e)


async def _gateway_error(_: Request, e: GatewayError) -> JSONResponse:
    return _error_response(api_error(e))


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(str(e.detail), type_), status_code=e.status_code, headers=e.headers)


def create_app(gateway: Gateway, tenancy: Tenancy | None = None, metrics: Metrics | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    tenancy = tenancy or Tenancy()
    metrics = metrics or Metrics()
    app = FastAPI(title="deltafleet", summary="OpenAI-compatible multi-tenant LLM server", docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    app.state.gateway, app.state.tenancy, app.state.metrics = gateway, tenancy, metrics
    app.state.service = Service(gateway, tenancy, metrics)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # innermost: its 413 gets the request id and is counted
    app.add_middleware(RequestIds)
    app.add_middleware(CountResponses, metrics=metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for module in (openai, admin, health):
        app.include_router(module.router)
    openapi.install(app)
    return app
