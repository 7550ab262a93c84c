"""Routing policies (serve.routing) and the routing simulation (`deltafleet bench route`)."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from deltafleet.bench.route import RouteConfig, simulate, zipf_cdf
from deltafleet.serve.routing import ROUTERS, ReplicaView

V = ReplicaView


def test_affinity_prefers_holding_then_room_then_least_loaded():
    rng = random.Random(0)
    aff = ROUTERS["affinity"]
    assert aff([V(False, 0, 1), V(True, 0, 5), V(False, 3, 2)], rng, 16) == 1  # resident, though busier
    assert aff([V(False, 0, 1), V(False, 0, 5), V(False, 3, 2)], rng, 16) == 2  # room to load it
    assert aff([V(False, 0, 4), V(False, 0, 1), V(False, 0, 2)], rng, 16) == 1  # least loaded
    assert aff([V(True, 0, 9), V(True, 0, 7), V(False, 0, 0)], rng, 8) == 1  # least loaded holder
    assert aff([V(True, 0, 20), V(False, 2, 3), V(False, 0, 1)], rng, 16) == 1  # spills past the gap: room first
    assert aff([V(True, 0, 20), V(False, 2, 19), V(False, 0, 1)], rng, 16) == 2  # ... else the least loaded


def test_least_loaded_and_random():
    views = [V(True, 0, 3), V(False, 1, 0), V(False, 1, 0)]
    assert ROUTERS["least_loaded"](views, random.Random(0), 16) == 1  # ties: lowest index
    picks = {ROUTERS["random"](views, random.Random(s), 16) for s in range(30)}
    assert picks == {0, 1, 2}


def test_zipf_cdf_is_a_distribution():
    cdf = zipf_cdf(100, 1.0)
    assert cdf[-1] == pytest.approx(1.0) and all(a < b for a, b in zip(cdf, cdf[1:], strict=False))
    assert cdf[0] == pytest.approx(1 / sum(1 / k for k in range(1, 101)))


SMALL = RouteConfig(tenants=400, replicas=(8,), slots=8, batch=4, requests_per_replica=300, service_s=1.0,
                    cold_load_s=0.2)


def test_affinity_misses_less_than_random_and_least_loaded():
    rows = {p: simulate(SMALL, p, 8) for p in ("random", "least_loaded", "affinity")}
    assert rows["affinity"]["miss_rate"] < 0.8 * min(rows["random"]["miss_rate"], rows["least_loaded"]["miss_rate"])
    for r in rows.values():
        assert r["requests"] == 2400 and r["counted"] == 1920 and r["imbalance"] >= 1.0
        assert SMALL.service_s <= r["latency_p50_s"] <= r["latency_p99_s"] <= r["latency_p999_s"]
        assert r["distinct_resident"] <= 8 * SMALL.slots
    assert simulate(SMALL, "affinity", 8) == rows["affinity"]  # deterministic


def test_one_tenant_never_misses_after_warmup_and_a_miss_costs_the_cold_load():
    one = RouteConfig(tenants=1, replicas=(1,), slots=1, batch=1, requests_per_replica=200, service_s=1.0,
                      cold_load_s=0.5, utilization=0.5)
    r = simulate(one, "affinity", 1)
    assert r["miss_rate"] == 0.0
    many = RouteConfig(tenants=10_000, zipf=0.0, replicas=(1,), slots=1, batch=1, requests_per_replica=200,
                       service_s=1.0, cold_load_s=0.5, utilization=0.3)
    r = simulate(many, "random", 1)
    assert r["miss_rate"] > 0.99 and r["latency_p50_s"] >= 1.5  # every request loads its tenant first


def test_config_rules():
    for kw, msg in [({"slots": 2, "batch": 4}, "slots=2 < batch=4"), ({"utilization": 1.0}, "utilization=1.0"),
                    ({"policies": ("round_robin",)}, "unknown"), ({"replicas": ()}, "replicas"),
                    ({"warmup": 1.0}, "warmup=1.0"), ({"tenants": 0}, "tenants=0")]:
        with pytest.raises(ValueError, match=msg):
            RouteConfig(**kw)


def test_cli_bench_route_json_and_plot(tmp_path):
    from deltafleet.cli import app

    png = tmp_path / "route.png"
    r = CliRunner().invoke(app, ["bench", "route", "--tenants", "300", "--replicas", "2,4", "--slots", "4",
                                 "--batch", "2", "--requests-per-replica", "100", "--cold-load-s", "0.1",
                                 "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert [(row["replicas"], row["policy"]) for row in rep["rows"]] == [
        (n, p) for n in (2, 4) for p in ("random", "least_loaded", "affinity")]
    assert png.is_file() and png.stat().st_size > 10_000 and rep["cold_load_measured"] is None
    r = CliRunner().invoke(app, ["bench", "route", "--slots", "2", "--batch", "4", "--cold-load-s", "0.1"])
    assert r.exit_code == 2 and "slots=2 < batch=4" in r.output
