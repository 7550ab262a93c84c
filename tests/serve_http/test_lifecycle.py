"""Adapter load/unload, disconnects, the queue bound, graceful shutdown, metrics, and the torch-free HTTP layer."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.serve_http.conftest import KEYS, MODEL

ADMIN = {"Authorization": f"Bearer {KEYS['ops']}"}
ACME = {"Authorization": f"Bearer {KEYS['acme']}"}
LONG = 440  # tokens: long enough to still be running while the test acts (max_model_len 512)


def wait_until(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def adapters(live, headers=ADMIN) -> dict[str, dict]:
    r = httpx.get(f"{live.url}/v1/adapters", headers=headers)
    assert r.status_code == 200, r.text
    return {a["id"]: a for a in r.json()["data"]}


def test_listing_reports_kind_rank_bytes_and_state(fresh_server, adapters_root):
    live = fresh_server()
    listed = adapters(live, {})
    assert set(listed) == {p.name for p in adapters_root.iterdir() if not p.name.startswith(".")}
    assert all(a["state"] == "on_disk" and a["bytes"] > 0 for a in listed.values())
    assert (listed["acme-lora"]["kind"], listed["acme-lora"]["rank_or_variant"]) == ("lora", "r=8")
    assert (listed["acme-road"]["kind"], listed["acme-road"]["rank_or_variant"]) == ("road", "road_1 g=64")
    live.client().completions.create(model="acme-road", prompt="x", max_tokens=2)
    after = adapters(live, {})["acme-road"]
    assert after["state"] == "resident" and after["kind"] == "road" and after["bytes"] > 0


def test_load_then_use_at_once_then_unload_while_in_use(live, solo):
    r = httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-temp", "path": "acme-lora"}, headers=ADMIN)
    assert r.status_code == 202 and r.json()["id"] == "acme-temp"
    assert r.json()["state"] in ("on_disk", "loading", "host_memory", "resident")
    client = live.client(KEYS["acme"])
    ids = live.gateway.encode("Tenant text")
    # a request right after the load waits for it rather than failing
    got = client.completions.create(model="acme-temp", prompt="Tenant text", max_tokens=5, temperature=0)
    assert got.choices[0].text == solo(ids, 5, "acme-lora")[0]
    assert "acme-temp" in {m.id for m in client.models.list().data}

    stream = client.completions.create(model="acme-temp", prompt="Tenant text", max_tokens=60, temperature=0,
                                       stream=True)
    parts = [next(iter(stream)).choices[0].text]
    assert httpx.delete(f"{live.url}/v1/adapters/acme-temp", headers=ADMIN).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):  # new requests fail at once
        client.completions.create(model="acme-temp", prompt="Tenant text", max_tokens=2)
    parts += [c.choices[0].text for c in stream]  # the running one finishes with its adapter
    assert "".join(parts) == solo(ids, 60, "acme-lora")[0]
    assert "acme-temp" not in adapters(live) and "acme-temp" not in {m.id for m in client.models.list().data}
    assert httpx.delete(f"{live.url}/v1/adapters/acme-temp", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("body,status,param", [
    ({"name": "escape", "path": "../models0"}, 400, "path"),
    ({"name": "escape", "path": "/etc"}, 400, "path"),
    ({"name": "ghost", "path": "no-such-dir"}, 400, "path"),
    ({"name": "a/b", "path": "acme-lora"}, 400, "name"),
    ({"name": MODEL, "path": "acme-lora"}, 400, "name"),
    ({"name": "acme-lora", "path": "acme-road"}, 409, "name"),
    ({"path": "acme-lora"}, 400, "name"),
])
def test_load_refusals(live, body, status, param):
    r = httpx.post(f"{live.url}/v1/adapters", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_broken_adapter_fails_its_requests_not_the_server(live, adapters_root):
    broken = adapters_root / ".broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert httpx.post(f"{live.url}/v1/adapters", json={"name": "acme-broken", "path": ".broken"},
                      headers=ADMIN).status_code == 202
    r = httpx.post(f"{live.url}/v1/completions", json={"model": "acme-broken", "prompt": "x", "max_tokens": 2},
                   headers=ACME, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert r.headers["x-request-id"] in r.json()["error"]["message"]  # the reason is in the server log
    listed = adapters(live)["acme-broken"]  # and, relative to the adapters root, in the admin's listing
    assert listed["state"] == "error" and ".broken/adapter_model.safetensors" in listed["error"]
    assert str(adapters_root) not in r.text + listed["error"]
    assert httpx.delete(f"{live.url}/v1/adapters/acme-broken", headers=ADMIN).status_code == 200
    assert live.client(KEYS["acme"]).completions.create(model="acme-lora", prompt="x", max_tokens=2).choices


def test_disconnect_mid_stream_frees_the_slot(live):
    before = live.gateway.stats()["generated_tokens"]
    stream = live.client(KEYS["acme"]).chat.completions.create(
        model="acme-lora", messages=[{"role": "user", "content": "go"}], max_tokens=LONG, stream=True,
        extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    assert live.gateway.stats()["running"] == 1
    stream.close()
    assert wait_until(lambda: live.gateway.stats()["running"] == 0, timeout=2.0)
    assert live.gateway.stats()["generated_tokens"] - before < LONG


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(live):
    before = live.gateway.stats()["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", headers=ACME, timeout=httpx.Timeout(5.0, read=0.3),
                   json={"model": MODEL, "prompt": "go", "max_tokens": LONG, "ignore_eos": True})
    assert wait_until(lambda: live.gateway.stats()["running"] == 0, timeout=2.0)
    assert live.gateway.stats()["generated_tokens"] - before < LONG


def test_queue_full_is_429_with_retry_after(fresh_server):
    live = fresh_server(max_batch=1, max_queue=1)
    client = live.client()
    running = client.completions.create(model=MODEL, prompt="a", max_tokens=LONG, stream=True,
                                        extra_body={"ignore_eos": True})
    next(iter(running))
    waiting: list = []
    t = threading.Thread(target=lambda: waiting.append(client.completions.create(model=MODEL, prompt="b",
                                                                                  max_tokens=3)))
    t.start()
    assert wait_until(lambda: live.gateway.stats()["waiting"] == 1)
    r = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "c", "max_tokens": 3})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "c"}], max_tokens=3)
    running.close()
    t.join(10)
    assert waiting and waiting[0].usage.completion_tokens == 3


def test_shutdown_refuses_new_requests_and_finishes_running_ones(fresh_server):
    live = fresh_server(deadline=30.0)
    stream = live.client().completions.create(model=MODEL, prompt="a", max_tokens=120, stream=True,
                                              extra_body={"ignore_eos": True})
    it = iter(stream)
    first = next(it)
    drain = live.server.server.drain()
    r = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "b", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{live.url}/health").status_code == 503
    rest = list(it)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len([first, *rest]) >= 2 and live.gateway.stats()["generated_tokens"] == 120
    drain.join(10)
    live.server.thread.join(10)
    assert not live.server.thread.is_alive()


def test_shutdown_deadline_aborts_with_an_error_event(fresh_server):
    live = fresh_server(deadline=0.2)
    with httpx.stream("POST", f"{live.url}/v1/completions", timeout=30,
                      json={"model": MODEL, "prompt": "a", "max_tokens": LONG, "ignore_eos": True,
                            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        live.server.server.drain()
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"code":"aborted"' in rest[-2]
    assert live.gateway.stats()["generated_tokens"] < LONG


def test_metrics_in_prometheus_text(live):
    live.client(KEYS["acme"]).completions.create(model="acme-lora", prompt="m", max_tokens=3)
    r = httpx.get(f"{live.url}/metrics", headers=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in ("deltafleet_queue_depth", "deltafleet_running_requests", "deltafleet_resident_adapters",
                 "deltafleet_adapter_cache_hits_total", "deltafleet_adapter_cache_misses_total",
                 "deltafleet_adapter_cache_evictions_total"):
        assert name in values
    assert values["deltafleet_generated_tokens_total"] >= 3
    assert values["deltafleet_time_to_first_token_seconds_count"] >= 1
    assert values['deltafleet_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        values["deltafleet_time_to_first_token_seconds_count"]
    assert values["deltafleet_inter_token_latency_seconds_count"] >= 2
    assert values['deltafleet_http_responses_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert KEYS["acme"] not in r.text


def test_http_layer_does_not_import_torch():
    code = ("import sys, deltafleet.serve.http.app, deltafleet.serve.http.server, deltafleet.cli.serve; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
