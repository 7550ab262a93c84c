"""Operations: /health (liveness, no key; 503 while draining) and /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from deltafleet.serve.http import openapi as O
from deltafleet.serve.http.routes import Svc

router = APIRouter()


@router.get("/health", responses={**O.responses(O.Health), 503: {"model": O.Health, "description": "Draining"}})
async def health(svc: Svc):
    if svc.gateway.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}


PROMETHEUS_TEXT = {"description": "Prometheus text format 0.0.4",
                   "content": {"text/plain": {"schema": {"type": "string"}}}}


@router.get("/metrics", response_class=Response, responses={200: PROMETHEUS_TEXT, **O.responses(None, 401, 403)})
async def metrics(request: Request, svc: Svc):
    text = await svc.metrics_text(request.headers.get("authorization"))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
