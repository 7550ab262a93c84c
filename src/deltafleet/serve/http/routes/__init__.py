"""HTTP routes (FastAPI routers): each reads the HTTP request, calls the `Service`, and wraps what it returns.

`openai` (completions, chat, models), `admin` (adapter lifecycle), `health` (liveness, Prometheus metrics).
`create_app` (app.py) puts the `Service` on `app.state`; routes receive it as the `Svc` dependency.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.service import Service


def _service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(_service)]
NameParam = Annotated[str, Path(json_schema_extra={"pattern": P.NO_CONTROL_PATTERN})]
"""A model or adapter name in the URL; the schema states the control-character rule the service checks."""
