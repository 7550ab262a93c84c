"""`deltafleet bench methods` on the tiny chat model: each run in its own child, every row complete."""

from __future__ import annotations

from deltafleet.bench.methods import MethodsConfig, run, summarize


def test_methods_bench_runs_each_method_in_a_child(chat_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFLEET_CACHE_DIR", str(tmp_path / "cache"))
    rep = run(MethodsConfig(base=str(chat_tiny), tasks=("sort",), methods=("lora", "pafi"), steps=2, batch_size=2,
                            test_examples=2, precision="fp32"), log=lambda m: None)
    assert [r["method"] for r in rep["runs"]] == ["lora", "pafi"]
    for r in rep["runs"]:
        assert r["steps"] == 2 and 0 <= r["test_accuracy"] <= 1 and r["trainable_params"] > 0
        assert r["stored_bytes"] > 0 and r["peak_rss_mb"] > 50
    assert rep["cpu"]["model"] and "avx2" in rep["cpu"]["flags"]
    assert rep["summary"]["lora"]["accuracy_minus_lora"] == 0 and rep["summary"]["lora"]["peak_rss_over_lora"] == 1


def test_summary_compares_with_lora():
    rows = [{"method": m, "test_accuracy": a, "peak_rss_mb": r, "trainable_params": 1, "stored_bytes": 2}
            for m, a, r in (("lora", 0.5, 100.0), ("lora", 0.7, 100.0), ("meft", 0.5, 40.0), ("meft", 0.6, 60.0))]
    s = summarize(rows)
    assert s["meft"]["accuracy_minus_lora"] == -0.05 and s["meft"]["peak_rss_over_lora"] == 0.5
