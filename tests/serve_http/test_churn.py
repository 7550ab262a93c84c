"""The churn soak's short form (`deltafleet bench churn` runs the long one): adapters loaded, used and unloaded
through the admin API under new names, with 2 slots and a small host cache, while steady tenants stream."""

from __future__ import annotations

from deltafleet.bench.churn import run


def test_churn_soak_short(tiny_chat_model):
    res = run(str(tiny_chat_model), cycles=40, workers=3, streams=2, slots=2, distinct=6, host_cache_mb=1,
              max_tokens=3, timeout=60.0)
    assert res["hung"] == 0 and res["failures"] == {}
    churn = res["churn_outcomes"]
    assert churn.get("202", 0) >= 40 and churn.get("200", 0) >= 80  # every load accepted, every use and unload ok
    assert sum(res["steady_outcomes"].values()) == res["steady_outcomes"].get("200", 0) > 0
    assert res["listing_equals_start"]
    assert res["resident_gauge_after"] == res["resident_rows_after"] <= 2
    assert res["rss_growth_mb"] < 200  # a leak of slots or host copies would grow with every cycle
