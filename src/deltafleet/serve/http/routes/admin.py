"""The adapter lifecycle, for admin keys: list, load (by name and path under the adapters root), unload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.routes import Svc

router = APIRouter()


@router.get("/v1/adapters")
async def list_adapters(request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    return svc.adapters()


@router.post("/v1/adapters", status_code=202)
async def load_adapter(request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    req = P.parse(P.LoadAdapterRequest, await request.body())
    return JSONResponse(svc.load_adapter(req), status_code=202)


@router.delete("/v1/adapters/{name}")
async def unload_adapter(name: str, request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    return svc.unload_adapter(name)
