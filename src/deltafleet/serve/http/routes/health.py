"""Operations: /health (liveness, no key; 503 while draining) and /metrics (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from deltafleet.serve.http.routes import Svc

router = APIRouter()


@router.get("/health")
async def health(svc: Svc):
    if svc.gateway.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request, svc: Svc):
    text = svc.metrics_text(request.headers.get("authorization"))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
