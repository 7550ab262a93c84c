"""The OpenAPI document (`GET /openapi.json`): request bodies, response shapes and the errors of every route.

Routes parse their bodies themselves (`protocol.parse`, so every refusal is OpenAI's 400 with `param`), so
FastAPI never sees the request models; `body(model)` documents one in the route's `openapi_extra`, and `install`
adds those models' schemas to the document's components. It also drops FastAPI's automatic 422 responses (a
refusal here is 400, never 422) and declares the bearer key every route but /health takes. The response models
below only document: handlers build their JSON with `protocol`'s functions, and the schema fuzz test
(tests/serve_http/test_openapi_fuzz.py) checks the two agree.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import AdapterState

REQUEST_BODIES = (P.CompletionRequest, P.ChatCompletionRequest, P.LoadAdapterRequest, P.ReplaceAdapterRequest)
PUBLIC_PATHS = ("/health",)  # no key needed
_REF = "#/components/schemas/{model}"

ERROR_DESCRIPTIONS = {
    400: "Invalid parameter (`param` names it), or a prompt longer than the context",
    401: "Missing or invalid API key",
    403: "The endpoint needs an admin key",
    404: "Unknown model or adapter, or one the key may not use",
    409: "An adapter of that name is already registered",
    413: "Request body over the server's limit (`--max-body-bytes`)",
    429: "The waiting queue is full (`Retry-After`)",
    500: "Internal error: a generic message with the request id (also in `x-request-id`)",
    503: "Shutting down (`Retry-After`), or aborted by the shutdown deadline",
}


# ---------------------------------------------------------------------- response shapes (documentation only)
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterCard(BaseModel):
    id: str
    object: Literal["adapter"]
    state: AdapterState
    kind: str | None
    rank_or_variant: str | None
    bytes: int | None
    error: str | None
    replicas: dict[str, AdapterState] | None = None  # behind the Ray Serve ingress: the state on each replica


class AdapterList(BaseModel):
    object: Literal["list"]
    data: list[AdapterCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"]
    deleted: bool


class Health(BaseModel):
    status: Literal["ok", "draining"]


# ---------------------------------------------------------------------- route arguments
def body(model: type[P._Model]) -> dict:
    """`openapi_extra` of a route whose JSON body is `model` (one of REQUEST_BODIES)."""
    if model not in REQUEST_BODIES:
        raise ValueError(f"{model.__name__} is not in openapi.REQUEST_BODIES")
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def responses(ok: type[BaseModel] | None, *errors: int, status: int = 200, events: bool = False) -> dict:
    """`responses` of a route: `ok` at `status` (also as server-sent events when `events`), the `errors`, and the
    413 and 500 any route can answer."""
    out: dict = {}
    if ok is not None:
        out[status] = {"model": ok}
        if events:
            out[status]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    for code in sorted({*errors, 413, 500}):
        out[code] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]}
    return out


def install(app: FastAPI) -> None:
    """Serve FastAPI's document with the request bodies' schemas, no 422s, and the bearer key declared."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema([(m, "validation") for m in REQUEST_BODIES], ref_template=_REF)
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            clash = set(schemas) & set(defs["$defs"])
            if clash:
                raise ValueError(f"OpenAPI components defined twice: {sorted(clash)}")
            schemas.update(defs["$defs"])
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for op in operations.values():
                    op["responses"].pop("422", None)
                    if path not in PUBLIC_PATHS:
                        op["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi
