"""The light client and the open-loop phase against the real server on the tiny model, and `deltafleet bench
serve` with open-loop rates from the command line."""

from __future__ import annotations

import asyncio
import random

import pytest
from typer.testing import CliRunner

from deltafleet.bench.loadgen import Slo, chat_request, stream_chat
from deltafleet.bench.serve import OpenLoopConfig, Target, chat_body, run_open_loop
from deltafleet.cli import app
from tests.serve_http.conftest import ADAPTERS, MODEL


def _host_port(server) -> tuple[str, int]:
    return server.server.host, server.server.port


def test_stream_chat_against_the_server(fresh_server):
    host, port = _host_port(fresh_server())

    async def main():
        ok = await stream_chat(host, port, chat_request(host, port, chat_body("acme-lora", "Name a colour.", 5)))
        missing = await stream_chat(host, port, chat_request(host, port, chat_body("nobody", "Hi", 5)))
        return ok, missing

    ok, missing = asyncio.run(main())
    assert ok.status == 200 and ok.tokens == 5  # the usage chunk, ignore_eos: exactly max_tokens
    assert 1 <= len(ok.chunks) <= 5 and 0 < ok.ttft <= ok.chunks[-1] <= ok.latency
    assert missing.status == 404 and missing.chunks == []


def test_a_burst_past_the_queue_bound_gets_429(fresh_server):
    host, port = _host_port(fresh_server(max_batch=1, max_queue=1))
    request = chat_request(host, port, chat_body(MODEL, "Count to ten.", 24))

    async def main():
        return await asyncio.gather(*(stream_chat(host, port, request) for _ in range(8)))

    statuses = sorted(r.status for r in asyncio.run(main()))
    assert statuses[0] == 200 and statuses[-1] == 429 and set(statuses) == {200, 429}


def test_open_loop_phase_against_the_server(fresh_server):
    host, port = _host_port(fresh_server())
    target = Target(host, port, max_tokens=4, rng=random.Random(0))
    models = [MODEL, *ADAPTERS]
    cfg = OpenLoopConfig(rates=(25.0, 50.0), requests=16, tenants=len(ADAPTERS))
    lines = []
    phases = run_open_loop(target, models, cfg, Slo(ttft_s=10.0, itl_s=10.0), log=lines.append)
    assert [p.name for p in phases] == ["rate 25/s", "rate 50/s"] and len(lines) == 2
    for p in phases:
        assert p.requests == p.ok == 16 and p.errors == {}
        assert sum(p.models.values()) == 16 and set(p.models) <= set(models)
        assert p.output_tokens_per_s == pytest.approx(16 * 4 / p.seconds, rel=0.02)  # seconds rounded to 10 ms
        assert 0 < p.ttft_p50_s <= p.ttft_p99_s and 0 <= p.itl_p50_s <= p.itl_p99_s
        assert p.ttft_p50_s <= p.latency_p99_s
        assert p.slo_met == 16 and p.goodput_rps == p.requests_per_s  # an SLO every request meets
        assert p.offered_rps > 0 and p.send_lag_p99_s < 0.5
        assert p.client_cpu_s >= 0 and p.server_cpu_s is None  # the server runs in this process here
    strict = run_open_loop(Target(host, port, 4, random.Random(0)), models,
                           OpenLoopConfig(rates=(25.0,), requests=4), Slo(ttft_s=1e-6), log=lambda _: None)
    assert strict[0].ok == 4 and strict[0].slo_met == 0 and strict[0].goodput_rps == 0


def test_bench_serve_cli_open_loop_rates(tiny_chat_model):
    r = CliRunner().invoke(app, ["bench", "serve", "--base", str(tiny_chat_model), "--dtype", "float32",
                                 "--adapters", "2", "--clients", "2", "--requests", "3", "--max-tokens", "3",
                                 "--rate", "20", "--rate", "40", "--tenants", "3", "--bursts", "0"])
    assert r.exit_code == 0, r.output
    for text in ("rate 20/s", "rate 40/s", "ITL ms", "goodput/s", "CPU s: client",
                 "open loop: Poisson arrivals", "over base + 3 tenants", "mean ITL <= 200 ms"):
        assert text in r.output, text


def test_bench_serve_cli_refuses_bad_rates():
    r = CliRunner().invoke(app, ["bench", "serve", "--rate", "1,fast"])
    assert r.exit_code == 2 and "not numbers of requests/s" in r.output
    r = CliRunner().invoke(app, ["bench", "serve", "--rate", "0"])
    assert r.exit_code == 2 and "OpenLoopConfig.rates=(0.0,)" in r.output
