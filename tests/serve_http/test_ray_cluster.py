"""`deltafleet serve --ray` on a local Ray cluster (loopback, small object store): two engine replicas of the tiny
model behind the Ray Serve ingress, driven by the official openai client.

Checked: answers equal the single-process server's; a tenant's requests land on the replica holding it (the
replica label of the per-model counters); load, replace and unload reach every replica; a killed replica is
restarted by Ray and serves again, only its in-flight requests lost.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time

import httpx
import openai
import pytest
from ray import serve

from deltafleet.bench.serve import free_port
from deltafleet.serve.cluster.app import ClusterConfig
from deltafleet.serve.cluster.launch import start
from deltafleet.serve.cluster.replica import ClusterSpec
from tests.serve_http.conftest import ADAPTERS, ENGINE, KEYS, MODEL, TENANCY
from tests.serve_http.test_dashboard import check_series, dashboard, series_names

ADMIN = {"Authorization": f"Bearer {KEYS['ops']}"}


class Cluster:
    def __init__(self, url: str, root):
        self.url, self.root = url, root

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=ADMIN, timeout=30).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def per_replica(self, model: str) -> dict[str, float]:
        """deltafleet_model_requests_total for `model`, by replica."""
        out = {}
        for key, value in self.metrics().items():
            if key.startswith("deltafleet_model_requests_total{") and f'model="{model}"' in key:
                out[key.split('replica="')[1].split('"')[0]] = value
        return out

    def replicas(self) -> set[str]:
        return {k.split('replica="')[1].split('"')[0] for k in self.metrics()
                if k.startswith("deltafleet_queue_depth{")}

    def adapters(self) -> dict[str, dict]:
        return {a["id"]: a for a in httpx.get(f"{self.url}/v1/adapters", headers=ADMIN, timeout=30).json()["data"]}


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tiny_chat_model, adapters_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-adapters")
    for name in ADAPTERS:  # the session's root also holds hostile entries other tests add
        shutil.copytree(adapters_root / name, root / name)
    spec = ClusterSpec(str(tiny_chat_model), str(root), MODEL, tuple(ENGINE.items()))
    config = ClusterConfig(spec, replicas=2, stats_period_s=0.5, spill=3, tenancy=TENANCY)
    launched = start(config, "127.0.0.1", free_port())  # a local Ray cluster, as `deltafleet serve --ray` starts
    try:
        c = Cluster(launched.url, root)
        wait_for(lambda: len(c.replicas()) == 2, what="both replicas in the metrics")
        yield c
    finally:
        launched.stop()


def greedy(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


def test_answers_equal_the_single_process_server(cluster, live):
    for model, key in ((MODEL, "ops"), ("acme-lora", "acme"), ("acme-road", "acme"), ("globex-delta", "globex")):
        for prompt in ("The cluster", "Tenants and replicas"):
            assert greedy(cluster.client(KEYS[key]), model, prompt) == greedy(live.client(KEYS[key]), model, prompt)
    chat = dict(model="globex-lora", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0)
    a = cluster.client(KEYS["globex"]).chat.completions.create(**chat).choices[0].message.content
    assert a == live.client(KEYS["globex"]).chat.completions.create(**chat).choices[0].message.content
    stream = cluster.client(KEYS["acme"]).completions.create(model="acme-lora", prompt="The cluster", max_tokens=8,
                                                             temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == greedy(live.client(KEYS["acme"]),
                                                                            "acme-lora", "The cluster")


def test_error_semantics_are_the_single_servers(cluster):
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter is as missing
        cluster.client(KEYS["acme"]).completions.create(model="globex-lora", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        cluster.client("sk-wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        cluster.client(KEYS["acme"]).completions.create(model="acme-lora", prompt="x", max_tokens=2, top_p=7)
    assert e.value.body["param"] == "top_p"


def test_a_tenants_requests_land_on_the_replica_holding_it(cluster):
    client = cluster.client(KEYS["acme"])
    before = cluster.per_replica("acme-road")
    for i in range(6):
        greedy(client, "acme-road", f"affinity {i}")
    after = cluster.per_replica("acme-road")
    served = {r: after[r] - before.get(r, 0) for r in after if after[r] - before.get(r, 0) > 0}
    assert len(served) == 1 and sum(served.values()) == 6, served


async def _concurrent(client: openai.AsyncOpenAI, model: str, n: int, max_tokens: int = 4) -> list[str]:
    async def one(i):
        r = await client.completions.create(model=model, prompt=f"burst {i}", max_tokens=max_tokens, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].text

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_hot_tenant_spreads_over_the_replicas(cluster):
    """Bursts of 12 concurrent requests for one tenant: once a replica is `spill` (3) requests over the other, the
    tenant spreads. The router reads loads from stats reported every 0.5 s, so a burst the first replica absorbs
    before its load shows may stay on it (seen once in a fresh-clone run on 2 busy cores): up to 3 bursts."""
    before = cluster.per_replica("globex-delta")

    async def burst_of_12() -> list[str]:  # a client per event loop: its connections belong to the loop they opened in
        async with openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=KEYS["globex"], max_retries=0,
                                      timeout=120) as client:
            return await _concurrent(client, "globex-delta", 12, max_tokens=48)

    for burst in range(1, 4):
        assert len(asyncio.run(burst_of_12())) == 12
        after = cluster.per_replica("globex-delta")
        served = {r: after[r] - before.get(r, 0) for r in after if after[r] > before.get(r, 0)}
        assert sum(served.values()) == 12 * burst, served  # every request answered, once
        if len(served) == 2:
            break
    assert len(served) == 2, served  # spread over both replicas


def test_load_replace_unload_reach_every_replica(cluster):
    shutil.copytree(cluster.root / "acme-lora", cluster.root / "new-weights")
    r = httpx.post(f"{cluster.url}/v1/adapters", headers=ADMIN, json={"name": "acme-extra", "path": "acme-lora"})
    assert r.status_code == 202, r.text
    conflict = httpx.post(f"{cluster.url}/v1/adapters", headers=ADMIN, json={"name": "acme-extra",
                                                                             "path": "acme-road"})
    assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "name"
    missing = httpx.post(f"{cluster.url}/v1/adapters", headers=ADMIN, json={"name": "acme-other", "path": "x"})
    assert missing.status_code == 400 and "no such adapter directory" in missing.json()["error"]["message"]
    outside = httpx.post(f"{cluster.url}/v1/adapters", headers=ADMIN, json={"name": "evil", "path": "../.."})
    assert outside.status_code == 400 and "adapters root" in outside.json()["error"]["message"]
    client = cluster.client(KEYS["acme"])
    assert greedy(client, "acme-extra", "same weights") == greedy(client, "acme-lora", "same weights")
    wait_for(lambda: set(cluster.adapters()["acme-extra"]["replicas"]) == cluster.replicas(),
             what="every replica to register acme-extra")
    # replace with other weights: every later request, on any replica, gets them
    r = httpx.put(f"{cluster.url}/v1/adapters/acme-extra", headers=ADMIN, json={"path": "acme-road"}, timeout=60)
    assert r.status_code == 200, r.text
    want = greedy(client, "acme-road", "replaced")
    answers = asyncio.run(_concurrent(openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=KEYS["acme"],
                                                         max_retries=0), "acme-extra", 1))
    assert greedy(client, "acme-extra", "replaced") == want and answers
    bad = httpx.put(f"{cluster.url}/v1/adapters/acme-extra", headers=ADMIN, json={"path": "nope"}, timeout=60)
    assert bad.status_code == 400
    assert greedy(client, "acme-extra", "replaced") == want  # a refused replace keeps the weights
    r = httpx.delete(f"{cluster.url}/v1/adapters/acme-extra", headers=ADMIN)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        greedy(client, "acme-extra", "gone")
    wait_for(lambda: "acme-extra" not in cluster.adapters(), what="the listing to drop acme-extra")
    assert httpx.delete(f"{cluster.url}/v1/adapters/acme-extra", headers=ADMIN).status_code == 404


def test_a_killed_replica_is_restarted_and_serves_again(cluster):
    client = cluster.client(KEYS["globex"])
    before = cluster.per_replica("globex-lora")
    greedy(client, "globex-lora", "warm")
    holder = next(r for r, n in cluster.per_replica("globex-lora").items() if n > before.get(r, 0))
    registry = serve.get_deployment_handle("registry", app_name="deltafleet")
    pid = registry.reported.remote().result()[holder][0]["pid"]
    in_flight = client.completions.create(model="globex-lora", prompt="long", max_tokens=400, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
    next(iter(in_flight))  # it runs on the holder (affinity)
    os.kill(pid, signal.SIGKILL)  # the replica holding the tenant dies, as a crashed process does
    t0 = time.monotonic()
    with pytest.raises(openai.APIError):  # the request in flight there is lost, with an error event
        for _ in in_flight:
            pass
    outcomes = []
    while time.monotonic() - t0 < 6:  # the tenant keeps being answered while Ray restarts the replica
        try:
            outcomes.append(greedy(client, "globex-lora", "during restart") is not None)
        except openai.APIError as e:
            outcomes.append(type(e).__name__)
    assert outcomes.count(True) >= 1 and len(outcomes) - outcomes.count(True) <= 1, outcomes

    def restarted():
        pids = {r: s["pid"] for r, (s, _) in registry.reported.remote().result().items()}
        return len(pids) == 2 and pid not in pids.values()

    wait_for(restarted, timeout=120, what="Ray to restart the killed replica")
    print(f"replica restarted in {time.monotonic() - t0:.1f} s; outcomes while down: {outcomes}")
    for i in range(4):  # the new replica serves: requests for a tenant spread once the spill allows
        assert greedy(client, "globex-lora", f"after {i}")


def test_the_dashboard_reads_the_ingress_series_per_replica(cluster):
    greedy(cluster.client(KEYS["acme"]), "acme-lora", "dashboard")
    text = httpx.get(f"{cluster.url}/metrics", headers=ADMIN, timeout=30).text
    check_series(dashboard(), series_names(text))
    assert {'replica="engine-0"', 'replica="engine-1"'} <= set(re.findall(r'replica="[^"]+"', text))
