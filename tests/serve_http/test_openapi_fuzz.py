"""Schema-driven fuzzing of the HTTP API: schemathesis reads /openapi.json and calls the app in process (ASGI).

Every operation gets generated requests with an admin key: valid ones by the schema (half of them steered to
things that exist: the base model's name, an adapter directory, so generation and loading really run) and, for
the operations that take input, invalid ones. Each response must not be a 500, must have a status and content
type the document lists and a JSON body that matches the documented schema; invalid requests must be refused
(4xx), and so must requests without the key (401). The engine is the tiny 2-layer model with a 64-token context
on its own copy of the adapters (the fuzz loads and deletes adapters). Bounded for CI: `EXAMPLES` per operation
and mode (about 260 requests, about 15 s on 2 cores), derandomized, no example database.
"""

from __future__ import annotations

import shutil
import zlib

import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # noqa: F401  (loaded here, at a shallow stack, not lazily in a fixture)
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from deltafleet.serve.engine import EngineConfig
from deltafleet.serve.http.app import create_app
from deltafleet.serve.http.engine_gateway import EngineGateway
from deltafleet.serve.http.tenancy import Tenancy
from tests.serve_http.conftest import ADAPTERS, ENGINE, KEYS, MODEL, TENANCY

OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/v1/models/{model}"), ("GET", "/v1/adapters"), ("POST", "/v1/adapters"),
              ("PUT", "/v1/adapters/{name}"), ("DELETE", "/v1/adapters/{name}"), ("GET", "/health"),
              ("GET", "/metrics")]
EXAMPLES = 20  # per operation and mode: at most (9 valid + 5 invalid) x 20 requests
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, ignored_auth]
ADMIN = {"Authorization": f"Bearer {KEYS['ops']}"}


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_chat_model, adapters_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "adapters"
    shutil.copytree(adapters_root, root, ignore=shutil.ignore_patterns(".*"))
    gateway = EngineGateway.from_pretrained(tiny_chat_model, root, EngineConfig(**{**ENGINE, "max_model_len": 64}),
                                            MODEL)
    yield gateway
    gateway.shutdown(5.0)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_gateway):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(fuzz_gateway, Tenancy.from_dict(TENANCY)))


def steer(case) -> None:
    """Point half the valid requests at things that exist, so they get past "not found" (which half: by a hash of
    the request, so runs repeat): `model` names the base model, `path` an adapter directory."""
    if not case.meta.generation.mode.is_positive or zlib.crc32(repr((case.body, case.path_parameters)).encode()) % 2:
        return
    if "model" in (case.path_parameters or {}):
        case.path_parameters["model"] = MODEL
    if case.method == "PUT" and "name" in (case.path_parameters or {}):  # replace a registered adapter
        case.path_parameters["name"] = sorted(ADAPTERS)[len(case.path_parameters["name"]) % len(ADAPTERS)]
    if isinstance(case.body, dict):
        if "model" in case.body:
            case.body["model"] = MODEL
        if "path" in case.body:
            key = case.body.get("name") or (case.path_parameters or {}).get("name", "")
            case.body["path"] = sorted(ADAPTERS)[len(key) % len(ADAPTERS)]


def test_every_operation_is_fuzzed(fuzz_schema):
    documented = {(op.ok().method.upper(), op.ok().path) for op in fuzz_schema.get_all_operations()}
    assert documented == set(OPERATIONS)


@pytest.mark.parametrize("method,path,mode", [
    *((m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS),
    *((m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m in ("POST", "PUT") or "{" in p),  # those with inputs
])
def test_api_conforms_to_its_openapi_document(fuzz_schema, method, path, mode):
    operation = fuzz_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        steer(case)
        case.call_and_validate(headers=ADMIN, checks=CHECKS)

    fuzz()
