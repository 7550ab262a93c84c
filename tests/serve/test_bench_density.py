"""`bench density` on the tiny model: the report has the keys issue 18 names, per kind and per tenant count, and
its figures are consistent (every request answered, bytes per kind ordered as their sizes are)."""

from __future__ import annotations

from deltafleet.bench.density import KINDS, DensityConfig, run, tenant_names


def test_tenant_names_split_kinds_evenly_in_any_prefix():
    names = tenant_names(9)
    assert [k for _, k in names[:3]] == list(KINDS) and len({n for n, _ in names}) == 9


def test_density_report_on_the_tiny_model(tiny_llama, tmp_path):
    cfg = DensityConfig(base=str(tiny_llama), dtype="float32", tenants=(6, 9), batch=4, slots=2, requests=12,
                        prompt_len=4, max_tokens=3, rounds=1, host_cache_gb=0.01, ratio=1 / 4)
    rep = run(cfg, tmp_path / "tenants")
    for key in ("tenants", "bytes_per_tenant", "throughput_vs_base", "cold_load_p99_s", "rss_gb"):
        assert key in rep
    assert rep["tenants"] == 9 and [(r["tier"], r["tenants"]) for r in rep["rows"]] == [
        ("preloaded", 6), ("preloaded", 9), ("disk", 6), ("disk", 9)]
    assert rep["tier"] == "preloaded" and set(rep["by_tier"]) == {"preloaded", "disk"}
    for row in rep["rows"]:
        b = row["bytes_per_tenant"]
        assert set(b) == set(KINDS) and b["road"]["disk"] < b["lora"]["disk"]
        assert row["failed_requests"] == 0 and row["throughput_vs_base"] > 0 and 0 <= row["slot_miss_rate"] <= 1
        if row["tier"] == "preloaded":  # every tenant read before the stream (the tiny ones fit the cache)
            assert row["preloaded"] == row["tenants"] and row["host_loads"] == 0
        else:
            assert row["host_loads"] >= 1
    assert len(list((tmp_path / "tenants").iterdir())) == 9  # written once, reused by the second count


def test_density_config_refuses_unknown_tiers():
    import pytest

    with pytest.raises(ValueError, match="tiers"):
        DensityConfig(tiers=("ram",))
    with pytest.raises(ValueError, match="tiers"):
        DensityConfig(tiers=())
