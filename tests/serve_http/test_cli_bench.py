"""`deltafleet serve` refuses bad input before loading anything; `bench serve` runs end to end on the tiny model."""

from __future__ import annotations

import statistics

from typer.testing import CliRunner

from deltafleet.bench.serve import percentile, run_bench
from deltafleet.cli import app


def test_serve_refuses_a_bad_tenancy_file(tmp_path):
    bad = tmp_path / "tenants.toml"
    bad.write_text('[[tenants]]\nname = "a"\napi_key = "short"\n')
    r = CliRunner().invoke(app, ["serve", "--config", str(bad)])
    assert r.exit_code == 2 and "at least 8 characters" in r.output


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 99) == 5.0


def test_bench_serve_end_to_end_on_the_tiny_model(tiny_chat_model):
    res = run_bench(str(tiny_chat_model), "float32", n_adapters=3, clients=2, requests=4, max_tokens=3,
                    max_batch=1, max_queue=2, burst_size=10, bursts=1, seed=0, log=lambda _: None)
    for phase in res["phases"]:
        assert phase["ok"] == 4 and phase["errors"] == {} and phase["output_tokens_per_s"] > 0
        assert phase["latency_p50_s"] <= phase["latency_p99_s"]
    burst = res["overload"]["bursts"][0]
    assert burst["errors"].get("429", 0) >= 1 and burst["ok"] >= 1 and burst["ok"] + burst["errors"]["429"] == 10
    assert res["overload"]["healthy_after"]
    assert res["adapter_cache"]["deltafleet_adapter_cache_loads_total"] >= 1


def test_bench_engine_reports_every_scenario_ratio_and_limit(tiny_chat_model):
    from deltafleet.bench.engine import RATIOS, SCENARIOS, quick_config, run

    rep = run(quick_config(base=str(tiny_chat_model), batch=4, max_tokens=6))
    assert set(rep["scenarios"]) == set(SCENARIOS)
    for name, r in rep["scenarios"].items():
        assert r["decode_tok_s"] > 0 and r["step_ms"] > 0, name
    assert set(rep["ratios"]) == set(RATIOS)
    assert {"lora32_vs_base", "road32_vs_base", "lora32_vs_peft", "lora128_vs_lora32"} <= set(rep["ratios"])
    for key, limit in rep["limits"].items():  # reading adapter bytes can only slow a step down
        assert 0 < limit <= 1.0 + 1e-9 or key == "lora128_vs_lora32", (key, limit)
    assert set(rep["paired_ratios_vs_base"]) == set(SCENARIOS) - {"base", "peft32"}
    pr = rep["paired_ratios_vs_base"]
    assert all(len(v) >= 2 for v in pr.values())  # one ratio per pair of adjacent decode steps
    assert rep["ratios"]["road32_vs_base"] == statistics.median(pr["road32"])
    assert rep["ratios"]["lora128_vs_lora32"] == statistics.median(pr["lora128"]) / statistics.median(pr["lora32"])
    assert rep["scenarios"]["lora32"]["distinct_per_step"] == 4
    assert rep["scenarios"]["base"]["adapter_bytes_per_step"] == 0
