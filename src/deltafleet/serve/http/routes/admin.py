"""The adapter lifecycle, for admin keys: list, load (by name and path under the adapters root), replace, unload."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from deltafleet.serve.http import openapi as O
from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.routes import NameParam, Svc

router = APIRouter()


@router.get("/v1/adapters", responses=O.responses(O.AdapterList, 401, 403))
async def list_adapters(request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    return await svc.adapters()


@router.post("/v1/adapters", status_code=202, openapi_extra=O.body(P.LoadAdapterRequest),
             responses=O.responses(O.AdapterCard, 400, 401, 403, 409, status=202))
async def load_adapter(request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    req = P.parse(P.LoadAdapterRequest, await request.body())
    return JSONResponse(await svc.load_adapter(req), status_code=202)


@router.put("/v1/adapters/{name}", openapi_extra=O.body(P.ReplaceAdapterRequest),
            responses=O.responses(O.AdapterCard, 400, 401, 403, 404))
async def replace_adapter(name: NameParam, request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    return await svc.replace_adapter(name, P.parse(P.ReplaceAdapterRequest, await request.body()))


@router.delete("/v1/adapters/{name}", responses=O.responses(O.AdapterDeleted, 400, 401, 403, 404))
async def unload_adapter(name: NameParam, request: Request, svc: Svc):
    svc.admin(request.headers.get("authorization"))
    return await svc.unload_adapter(name)
