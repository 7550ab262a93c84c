"""No tenant can affect another through the HTTP layer: the body limit, tokenization off the event loop, names with
control characters, the seed range, confinement by real path, error bodies without server paths, request ids, and
the published OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import time

import httpx
import pytest
from typer.testing import CliRunner

from deltafleet.cli import app as cli
from deltafleet.errors import ArtifactError
from deltafleet.serve.engine.types import InvalidParameterError, SamplingParams
from deltafleet.serve.http import gateway as G
from deltafleet.serve.http.app import create_app
from deltafleet.serve.http.middleware import DEFAULT_MAX_BODY_BYTES
from deltafleet.serve.http.tenancy import Tenancy
from deltafleet.store.paths import confined_files
from tests.serve_http.conftest import KEYS, MODEL

ADMIN = {"Authorization": f"Bearer {KEYS['ops']}"}
ACME = {"Authorization": f"Bearer {KEYS['acme']}"}
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def in_process(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://in-process", timeout=30)


def error_of(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    return err


class SlowTokenization:
    """A gateway whose tokenization takes `delay` seconds more (sleeping, as a long prompt keeps a worker busy)."""

    def __init__(self, gateway, delay: float):
        self._gateway, self.delay = gateway, delay

    def __getattr__(self, name):
        return getattr(self._gateway, name)

    def encode(self, text: str) -> list[int]:
        time.sleep(self.delay)
        return self._gateway.encode(text)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        time.sleep(self.delay)
        return self._gateway.chat_prompt(messages)


class Broken:
    """A gateway whose adapter listing fails with an exception naming a server path."""

    def __init__(self, gateway):
        self._gateway = gateway

    def __getattr__(self, name):
        return getattr(self._gateway, name)

    def adapters(self):
        raise RuntimeError("boom while reading /srv/secret/adapters/acme")


# ---------------------------------------------------------------------- the body limit
def test_a_declared_body_over_the_limit_is_413_before_any_of_it_is_read(live):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {live.server.host}\r\nAuthorization: Bearer {KEYS['acme']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {5 * 1024 * 1024}\r\n\r\n")
    with socket.create_connection((live.server.host, live.server.port), timeout=10) as s:
        s.sendall(head.encode())  # and not one byte of the body
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head_out, _, body = raw.partition(b"\r\n\r\n")
    lines = head_out.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert lines[0].startswith("HTTP/1.1 413") and REQUEST_ID.match(headers["x-request-id"])
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large" and str(DEFAULT_MAX_BODY_BYTES) in err["message"]


def test_a_streamed_body_stops_being_read_at_the_limit(live):
    app = create_app(live.gateway, Tenancy(), max_body_bytes=1000)
    pulled = []

    async def chunks():
        for i in range(1000):  # 100 kB in all, without Content-Length (chunked)
            pulled.append(i)
            yield b" " * 100

    async def scenario():
        async with in_process(app) as c:
            small = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
            big = await c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
            return small, big

    small, big = asyncio.run(scenario())
    assert small.status_code == 200
    assert error_of(big, 413)["code"] == "request_too_large" and "1000 bytes" in big.json()["error"]["message"]
    assert len(pulled) <= 12  # the limit plus one chunk, never the whole body
    assert REQUEST_ID.match(big.headers["x-request-id"])


def test_the_limit_is_a_serve_option():
    r = CliRunner().invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "--max-body-bytes" in r.output


# ---------------------------------------------------------------------- tokenization off the event loop
def test_a_long_tokenization_does_not_hold_up_other_requests(live):
    app = create_app(SlowTokenization(live.gateway, 1.5), Tenancy())

    async def scenario():
        async with in_process(app) as c:
            t0 = time.perf_counter()
            chat = asyncio.create_task(c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}))
            await asyncio.sleep(0.3)  # its tokenization is under way (were it on the loop, this sleep would last 1.5 s)
            health = await c.get("/health")
            health_at = time.perf_counter() - t0
            chat = await chat
            return health, health_at, chat, time.perf_counter() - t0

    health, health_at, chat, chat_at = asyncio.run(scenario())
    assert health.json() == {"status": "ok"} and health_at < 1.0 and chat_at >= 1.5
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"model": MODEL, "prompt": "lorem ipsum " * 250_000}, "prompt"),  # 3 MB
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * 250_000}]},
     "messages"),
])
def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(live, path, body, param):
    """Real tokenizer: 3 MB of text takes seconds to tokenize; it cannot fit the 512-token context whatever it
    encodes to (no token is longer than the tokenizer's longest), so it is refused at once."""
    t0 = time.perf_counter()
    r = httpx.post(f"{live.url}{path}", json=body, headers=ACME, timeout=60)
    assert time.perf_counter() - t0 < 1.5
    err = error_of(r, 400, param)
    assert err["code"] == "context_length_exceeded" and "3000000 characters" in err["message"]
    cap = live.gateway.prompts.max_prompt_chars  # 512 x the longest token's characters
    assert len(live.gateway.encode("lorem ipsum " * (cap // 12))) > 512  # under the cap: tokenized as before
    with pytest.raises(G.PromptTooLong):
        live.gateway.encode("x" * (cap + 1))


# ---------------------------------------------------------------------- names with control characters, the seed
@pytest.mark.parametrize("method,path,body,param", [
    ("POST", "/v1/adapters", {"name": "bad\x00name", "path": "acme-lora"}, "name"),
    ("POST", "/v1/adapters", {"name": "bad\nname", "path": "acme-lora"}, "name"),
    ("POST", "/v1/adapters", {"name": "acme-ok", "path": "acme-lora\x00"}, "path"),
    ("POST", "/v1/adapters", {"name": "acme-ok", "path": "acme\x85lora"}, "path"),
    ("POST", "/v1/completions", {"model": "tiny\x00chat", "prompt": "x"}, "model"),
    ("POST", "/v1/chat/completions", {"model": "\x1b[31mred", "messages": [{"role": "user", "content": "x"}]},
     "model"),
    ("GET", "/v1/models/bad%00name", None, "model"),
    ("DELETE", "/v1/adapters/bad%0Aname", None, "name"),
])
def test_control_characters_in_names_and_paths_are_400_naming_the_field(live, method, path, body, param):
    r = httpx.request(method, f"{live.url}{path}", json=body, headers=ADMIN, timeout=30)
    assert "control characters" in error_of(r, 400, param)["message"]


def test_a_path_too_long_for_the_file_system_is_400(live):
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-long", "path": "a" * 5000}, headers=ADMIN)
    assert "cannot be resolved" in error_of(r, 400, "path")["message"]


@pytest.mark.parametrize("seed,status", [(2**64, 400), (2**63, 400), (-(2**63) - 1, 400), (2**63 - 1, 200),
                                         (-(2**63), 200)])
def test_the_seed_range_is_checked(live, seed, status):
    r = httpx.post(f"{live.url}/v1/completions", headers=ACME, timeout=30, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 1.0, "seed": seed})
    if status == 400:
        assert "seed" in error_of(r, 400, "seed")["message"]
    else:
        assert r.status_code == 200, r.text


def test_the_engine_refuses_a_seed_outside_the_generator_range():
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(temperature=1.0, seed=2**64)
    assert e.value.field == "seed"
    assert SamplingParams(temperature=1.0, seed=2**64 - 1).seed == 2**64 - 1


# ---------------------------------------------------------------------- confinement by real path
@pytest.fixture
def outside(tmp_path, adapters_root):
    """A copy of acme-lora's files outside the adapters root."""
    d = tmp_path / "outside"
    shutil.copytree(adapters_root / "acme-lora", d)
    return d


def linked_adapter(adapters_root, name: str, links: dict[str, str]):
    """A hidden adapter directory (the start-up scan skips it) copying acme-lora, with `links` (file -> target)."""
    d = adapters_root / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(adapters_root / "acme-lora", d)
    for f, target in links.items():
        (d / f).unlink(missing_ok=True)
        os.symlink(target, d / f)
    return d


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "deltafleet.json"])
def test_a_file_linked_to_outside_the_root_is_refused(live, adapters_root, outside, linked):
    linked_adapter(adapters_root, ".linked", {linked: str(outside / linked)})
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-linked", "path": ".linked"}, headers=ADMIN)
    err = error_of(r, 400, "path")
    assert f".linked/{linked}: resolves outside the adapters root" in err["message"]
    assert str(adapters_root) not in r.text and str(outside) not in r.text
    assert "acme-linked" not in live.gateway.adapter_names()


def test_a_file_linked_to_inside_the_root_loads(live, adapters_root):
    linked_adapter(adapters_root, ".linked-inside", {
        "adapter_model.safetensors": str(adapters_root / "acme-lora" / "adapter_model.safetensors")})
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-linked-inside", "path": ".linked-inside"},
                   headers=ADMIN)
    assert r.status_code == 202, r.text
    try:
        got = live.client(KEYS["acme"]).completions.create(model="acme-linked-inside", prompt="x", max_tokens=2)
        assert got.choices[0].finish_reason in ("length", "stop")
    finally:
        assert httpx.delete(f"{live.url}/v1/adapters/acme-linked-inside", headers=ADMIN).status_code == 200


def test_a_fifo_or_a_bad_manifest_is_400_naming_the_file_relative_to_the_root(live, adapters_root):
    fifo = linked_adapter(adapters_root, ".fifo", {})
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")  # reading it would block the loader for ever
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-fifo", "path": ".fifo"}, headers=ADMIN)
    assert ".fifo/adapter_model.safetensors: is not a regular file" in error_of(r, 400, "path")["message"]
    bad = linked_adapter(adapters_root, ".bad-manifest", {})
    (bad / "deltafleet.json").write_text("{not json")
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-bad", "path": ".bad-manifest"}, headers=ADMIN)
    assert error_of(r, 400, "path")["message"].startswith("path='.bad-manifest': .bad-manifest/deltafleet.json: ")
    assert str(adapters_root) not in r.text


def test_confined_files_resolves_every_file_and_names_the_offender_relative_to_the_root(tmp_path, outside):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "adapter_config.json").write_text("{}")
    (root / "a" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "a" / "notes.txt").symlink_to("/etc/passwd")  # a file the load never opens
    (root / "inner").symlink_to(root / "a")  # a directory linked within the root
    with pytest.raises(ArtifactError) as e:
        confined_files(root / "inner", root)
    assert e.value.path == "a/adapter_model.safetensors" and "outside the adapters root" in e.value.rule
    (root / "a" / "adapter_model.safetensors").unlink()
    (root / "a" / "adapter_model.safetensors").write_bytes(b"weights")
    assert confined_files(root / "inner", root) == [(root / "a" / n).resolve() for n in
                                                   ("adapter_config.json", "adapter_model.safetensors")]
    (root / "out").symlink_to(outside)
    with pytest.raises(ArtifactError, match="outside the adapters root"):
        confined_files(root / "out", root)


# ---------------------------------------------------------------------- error bodies and request ids
def test_an_unexpected_error_is_a_generic_500_with_the_request_id_and_logged_in_full(live, caplog):
    app = create_app(Broken(live.gateway), Tenancy())

    async def scenario():
        async with in_process(app) as c:
            return await c.get("/v1/adapters")

    with caplog.at_level(logging.ERROR, logger="deltafleet.serve"):
        r = asyncio.run(scenario())
    err = error_of(r, 500)
    rid = r.headers["x-request-id"]
    assert REQUEST_ID.match(rid) and rid in err["message"] and err["type"] == "server_error"
    assert "boom" not in r.text and "/srv" not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and "boom while reading /srv/secret" in str(logged[0].exc_info[1])


def test_every_response_carries_its_own_request_id(live):
    responses = [
        httpx.get(f"{live.url}/health"),
        httpx.get(f"{live.url}/v1/models"),  # 401
        httpx.get(f"{live.url}/v1/nothing"),  # 404
        httpx.get(f"{live.url}/v1/completions"),  # 405
        httpx.post(f"{live.url}/v1/completions", content=b"{not json", headers=ACME),  # 400
        httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                   headers=ACME),
    ]
    assert [r.status_code for r in responses] == [200, 401, 404, 405, 400, 200]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(REQUEST_ID.match(i) for i in ids) and len(set(ids)) == len(ids)
    assert responses[3].headers["allow"] == "POST"


# ---------------------------------------------------------------------- the OpenAPI document
def test_the_openapi_document_is_published_with_the_request_bodies(live):
    r = httpx.get(f"{live.url}/openapi.json")  # no key needed: it holds nothing tenant-specific
    assert r.status_code == 200
    doc = r.json()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"),
            ("DELETE", "/v1/adapters/{name}"), ("GET", "/v1/models/{model}"), ("GET", "/health")} <= ops
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/adapters", "LoadAdapterRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"} and model in schemas
    assert set(schemas["CompletionRequest"]["required"]) == {"model", "prompt"}
    assert "seed" in schemas["CompletionRequest"]["properties"]
    assert not any("422" in op["responses"] for item in doc["paths"].values() for op in item.values())
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert httpx.get(f"{live.url}/docs").status_code == 404
