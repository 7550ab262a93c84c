"""The typed boundary between engine and gateway: exceptions by class, adapter states as enums, end to end."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import time

import httpx
import pytest

import deltafleet.serve.engine as engine_pkg
from deltafleet.errors import DeltafleetError
from deltafleet.serve.engine import EngineShutdownError, PromptTooLongError, QueueFullError, UnknownAdapterError
from deltafleet.serve.engine.adapters import AdapterState as EngineAdapterState
from deltafleet.serve.engine.types import InvalidParameterError
from deltafleet.serve.http import gateway as G
from deltafleet.serve.http.engine_gateway import ADAPTER_ERRORS, STATES, SUBMIT_ERRORS, gateway_error
from tests.serve_http.conftest import KEYS

ADMIN = {"Authorization": f"Bearer {KEYS['ops']}"}


def engine_exceptions() -> set[type[Exception]]:
    """Every exception class defined in a module of deltafleet.serve.engine."""
    found = set()
    for info in pkgutil.iter_modules(engine_pkg.__path__):
        module = importlib.import_module(f"{engine_pkg.__name__}.{info.name}")
        found |= {c for _, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, Exception) and c.__module__ == module.__name__}
    return found


def test_every_engine_exception_has_a_row_in_an_error_table():
    found = engine_exceptions()
    assert {UnknownAdapterError, QueueFullError, PromptTooLongError, EngineShutdownError,
            InvalidParameterError} <= found
    assert found <= set(SUBMIT_ERRORS) | set(ADAPTER_ERRORS)
    for table in (SUBMIT_ERRORS, ADAPTER_ERRORS):
        assert all(issubclass(error, G.GatewayError) for error, _ in table.values())


@pytest.mark.parametrize("exc,table,error,param", [
    (EngineShutdownError("the engine is shutting down"), SUBMIT_ERRORS, G.ShuttingDown, None),
    (PromptTooLongError("prompt of 9 tokens ..."), SUBMIT_ERRORS, G.PromptTooLong, "prompt"),
    (QueueFullError("queue full: 2 requests waiting"), SUBMIT_ERRORS, G.QueueFull, None),
    (UnknownAdapterError("adapter 'x' not found"), SUBMIT_ERRORS, G.UnknownModel, "model"),
    (InvalidParameterError("prompt_ids", "token ids must be in [0, 5)"), SUBMIT_ERRORS, G.InvalidRequest, "prompt"),
    (InvalidParameterError("temperature", "must be in [0, 2]", 3.0), SUBMIT_ERRORS, G.InvalidRequest, "temperature"),
    (ValueError("something else"), SUBMIT_ERRORS, G.InvalidRequest, None),
    (UnknownAdapterError("adapter 'x' not found"), ADAPTER_ERRORS, G.UnknownModel, "name"),
    (DeltafleetError("adapter 'x' is already registered"), ADAPTER_ERRORS, G.AdapterConflict, "name"),
])
def test_engine_exceptions_map_by_class_not_message(exc, table, error, param):
    got = gateway_error(exc, table)
    assert type(got) is error and got.param == param and got.message == str(exc)


def test_every_engine_adapter_state_has_a_gateway_state():
    assert set(STATES) == set(EngineAdapterState)
    assert sorted(STATES.values()) == sorted(G.AdapterState)  # one to one


def test_a_failed_adapter_is_listed_as_error_with_its_message(live, adapters_root):
    broken = adapters_root / ".broken-state"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-failed", "path": ".broken-state"}, headers=ADMIN)
    assert r.status_code == 202 and r.json()["error"] is None
    try:
        end = time.monotonic() + 30
        while (info := next(a for a in live.gateway.adapters() if a.name == "acme-failed")).state in (
                G.AdapterState.ON_DISK, G.AdapterState.LOADING) and time.monotonic() < end:
            time.sleep(0.02)
        assert info.state is G.AdapterState.FAILED and "adapter_model.safetensors" in info.error
        listed = {a["id"]: a for a in httpx.get(f"{live.url}/v1/adapters", headers=ADMIN).json()["data"]}
        assert listed["acme-failed"]["state"] == "error" and listed["acme-failed"]["error"] == info.error
        healthy = [a for a in live.gateway.adapters() if a.name != "acme-failed"]
        assert healthy and all(isinstance(a.state, G.AdapterState) and a.error is None for a in healthy)
        assert all(listed[a.name]["state"] != "error" and listed[a.name]["error"] is None for a in healthy)
    finally:
        assert httpx.delete(f"{live.url}/v1/adapters/acme-failed", headers=ADMIN).status_code == 200
