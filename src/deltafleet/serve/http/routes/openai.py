"""/v1/completions, /v1/chat/completions (stream: server-sent events ending with `[DONE]`), /v1/models."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from deltafleet.serve.http import openapi as O
from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.routes import NameParam, Svc
from deltafleet.serve.http.service import Service, Submitted, stream_flags

router = APIRouter()


class _SSEResponse(StreamingResponse):
    """Closes its event generator however the response ends, so an abandoned request is aborted at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(request: Request, svc: Service, sub: Submitted, req: P._Sampling):
    stream, include_usage = stream_flags(req)
    if stream:
        return _SSEResponse(svc.sse(sub, include_usage), media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await svc.collect(sub, _until_disconnected(request)))


async def _generate(request: Request, svc: Service, schema: type[P._Sampling], submit):
    """Authenticate, parse the body as `schema`, submit with `await submit(principal, req, t0)`, respond."""
    t0 = time.perf_counter()
    p = svc.principal(request.headers.get("authorization"))
    req = P.parse(schema, await request.body())
    return await _respond(request, svc, await submit(p, req, t0), req)


GENERATION_ERRORS = (400, 401, 404, 429, 503)


@router.post("/v1/completions", openapi_extra=O.body(P.CompletionRequest),
             responses=O.responses(O.Completion, *GENERATION_ERRORS, events=True))
async def completions(request: Request, svc: Svc):
    return await _generate(request, svc, P.CompletionRequest, svc.completion)


@router.post("/v1/chat/completions", openapi_extra=O.body(P.ChatCompletionRequest),
             responses=O.responses(O.ChatCompletion, *GENERATION_ERRORS, events=True))
async def chat_completions(request: Request, svc: Svc):
    return await _generate(request, svc, P.ChatCompletionRequest, svc.chat_completion)


@router.get("/v1/models", responses=O.responses(O.ModelList, 401))
async def list_models(request: Request, svc: Svc):
    return svc.models(svc.principal(request.headers.get("authorization")))


@router.get("/v1/models/{model:path}", responses=O.responses(O.ModelCard, 400, 401, 404))
async def get_model(model: NameParam, request: Request, svc: Svc):
    return svc.model(svc.principal(request.headers.get("authorization")), model)
