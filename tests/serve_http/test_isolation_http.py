"""Through the real server: one tenant's tiny temperature leaves another tenant's stream exact, and unloading a
resident idle adapter frees its slot (the gauge follows the listing) over many load-use-unload cycles; a failed
replacement's engine error maps to a 400 on `path`."""

from __future__ import annotations

import threading

import httpx

from deltafleet.serve.engine.adapters import AdapterLoadError
from deltafleet.serve.http.engine_gateway import ADAPTER_ERRORS, gateway_error
from deltafleet.serve.http.gateway import InvalidRequest
from tests.serve_http.conftest import KEYS

ACME = {"Authorization": f"Bearer {KEYS['acme']}"}


def test_tiny_temperatures_do_not_touch_another_tenant(live, solo):
    client = live.client(KEYS["globex"])
    prompt = "Victim text"
    stream = client.completions.create(model="globex-lora", prompt=prompt, max_tokens=40, temperature=0,
                                       stream=True)
    it = iter(stream)
    parts = [next(it).choices[0].text]
    results: list = []

    def attack(temperature: float) -> None:
        r = httpx.post(f"{live.url}/v1/completions", headers=ACME, timeout=30,
                       json={"model": "acme-lora", "prompt": "x", "max_tokens": 8, "temperature": temperature})
        results.append(r)

    threads = [threading.Thread(target=attack, args=(t,)) for t in (1e-38, 1e-300, 5e-324)]
    for t in threads:
        t.start()
    parts += [c.choices[0].text for c in it]
    for t in threads:
        t.join(30)
    assert "".join(parts) == solo(live.gateway.encode(prompt), 40, "globex-lora")[0]
    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
    want = solo(live.gateway.encode("x"), 8, "acme-lora")[0]  # that small a temperature is greedy in effect
    assert all(r.json()["choices"][0]["text"] == want for r in results)


def test_unloading_a_resident_idle_adapter_frees_its_slot(fresh_server, solo):
    live = fresh_server(lora_slots=2, delta_slots=0)
    ids = live.gateway.encode("cycle")

    def resident_gauge() -> float:
        line = next(x for x in httpx.get(f"{live.url}/metrics").text.splitlines()
                    if x.startswith("deltafleet_resident_adapters "))
        return float(line.split()[1])

    def listed_resident() -> int:
        rows = httpx.get(f"{live.url}/v1/adapters").json()["data"]
        return sum(a["state"] == "resident" for a in rows)

    for i in range(5):  # more cycles than slots: a leaked slot would starve the third
        name = f"cycle-{i % 2}"
        r = httpx.post(f"{live.url}/v1/adapters", json={"name": name, "path": "acme-lora"})
        assert r.status_code == 202, r.text
        got = live.client().completions.create(model=name, prompt="cycle", max_tokens=5, temperature=0, timeout=30)
        assert got.choices[0].text == solo(ids, 5, "acme-lora")[0]
        assert resident_gauge() == listed_resident() == 1
        r = httpx.delete(f"{live.url}/v1/adapters/{name}")
        assert r.status_code == 200 and r.json()["deleted"] is True, r.text
        assert resident_gauge() == listed_resident() == 0
        assert live.gateway.engine.adapters.slots_in_use == 0


def test_a_failed_replacement_maps_to_invalid_request_on_path():
    err = gateway_error(AdapterLoadError("adapter 'x' failed to load: KeyError: 'A'"), ADAPTER_ERRORS)
    assert type(err) is InvalidRequest and err.param == "path" and err.message.startswith("adapter 'x' failed")
