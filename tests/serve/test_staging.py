"""A compressed tenant kept compact in host memory is expanded for its slot on the loader thread, never on the
engine loop (an expansion took 0.33-0.47 s for Delta-CoMe at 1/64 on SmolLM2), and serves the merged answer."""

from __future__ import annotations

import threading

import pytest
import torch

from deltafleet.adapters import random_adapter, save_adapter
from deltafleet.adapters.serving import CompactForm
from deltafleet.bench.density import kind_configs
from deltafleet.models.config import ModelConfig
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from tests.serve.conftest import SoloReference


@pytest.fixture(scope="module")
def compact_root(tiny_llama, tmp_path_factory):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    root = tmp_path_factory.mktemp("compact")
    qcfg = kind_configs(cfg, 1 / 4)["ft"]
    for i in range(3):  # whole fine-tunes: projections, tables and gains
        save_adapter(random_adapter(cfg, qcfg, seed=40 + i, whole=True), root / f"q{i}", model_cfg=cfg)
    return root


def test_compact_tenants_expand_off_the_engine_loop_and_serve_the_merged_answer(tiny_llama, compact_root,
                                                                               monkeypatch):
    threads = []
    expand = CompactForm.materialize

    def recording(self):
        threads.append(threading.current_thread().name)
        return expand(self)

    monkeypatch.setattr(CompactForm, "materialize", recording)
    rank = max(sum(r for _, r in ranks) for _, ranks in kind_configs(
        ModelConfig.from_file(tiny_llama / "config.json"), 1 / 4)["ft"].bands)
    engine = Engine.from_pretrained(tiny_llama, compact_root, EngineConfig(
        dtype="float32", max_batch=4, max_model_len=64, lora_slots=1, road_slots=1, delta_slots=2,
        max_delta_rank=rank, pafi_slots=0, hiwi_slots=0, qdelta_slots=0))
    ref = SoloReference(tiny_llama, compact_root)
    prompt = [5, 9, 14, 3]

    def run(*names):
        outs = engine.generate([Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True), adapter=a)
                                for a in names])
        for a, out in zip(names, outs, strict=True):
            assert out.token_ids == ref(prompt, 6, a), a

    run("q0", "q1", None)  # loaded: the serving form built to validate each load is kept for its slot copy
    assert threads == []
    run("q2")  # two delta slots: q0 (least recently used) leaves its slot, stays compact in host memory
    run("q0")  # back: expanded again, on the loader thread
    assert threads and all(t.startswith("adapter-loader") for t in threads), threads
    assert engine.adapters.stats.misses == 4 and len(engine.adapters.timings.to_slot) == 4
    engine.shutdown()


def test_staged_expansions_count_against_the_host_cache(tiny_llama, compact_root):
    """A load keeps the expansion it built for the slot copy; those bytes count against `host_cache_bytes`, so
    loaded forms that alone would fit are evicted (least recently used first) to make room."""
    from deltafleet.adapters import load_adapter
    from deltafleet.adapters.serving import to_serving_form

    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    compact = load_adapter(compact_root / "q0", cfg).nbytes
    expanded = to_serving_form(load_adapter(compact_root / "q0", cfg), torch.float32).nbytes
    assert expanded > compact
    budget = 3 * compact + expanded  # the three compact forms fit; their three staged expansions do not
    engine = Engine.from_pretrained(tiny_llama, compact_root, EngineConfig(
        dtype="float32", max_batch=4, max_model_len=64, lora_slots=1, road_slots=1, delta_slots=2,
        max_delta_rank=256, pafi_slots=0, hiwi_slots=0, qdelta_slots=0, host_cache_bytes=budget))
    for name in ("q0", "q1", "q2"):
        engine.adapters.wait_loaded(name)
    m = engine.adapters
    assert len(m.staged) == 3 and m.stats.host_evictions >= 1
    held = sum(f.nbytes for f in m.host.values()) + sum(x.nbytes for _, x in m.staged.values())
    assert held <= budget or len(m.host) == 1
    engine.shutdown()


def test_replace_keeps_the_expansion_its_read_built(tiny_llama, compact_root, monkeypatch):
    """`replace` reads and validates the new weights in the caller's thread, building their serving form: that
    form is staged for the slot copy, not built a second time."""
    calls = []
    expand = CompactForm.materialize
    monkeypatch.setattr(CompactForm, "materialize", lambda self: calls.append(1) or expand(self))
    engine = Engine.from_pretrained(tiny_llama, compact_root, EngineConfig(
        dtype="float32", max_batch=4, max_model_len=64, lora_slots=1, road_slots=1, delta_slots=2,
        max_delta_rank=256, pafi_slots=0, hiwi_slots=0, qdelta_slots=0))
    engine.adapters.replace("q0", compact_root / "q2")
    assert "q0" in engine.adapters.staged
    prompt = [5, 9, 14, 3]
    (out,) = engine.generate([Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True), adapter="q0")])
    assert out.token_ids == SoloReference(tiny_llama, compact_root)(prompt, 6, "q2") and calls == []
    engine.shutdown()
