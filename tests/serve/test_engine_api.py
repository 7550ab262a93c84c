"""Engine API behaviour: peft as the oracle, backends against the reference, sampling, lifecycle and errors."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from deltafleet.adapters import load_adapter, random_adapter
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, to_serving_form
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from deltafleet.serve.engine.adapters import AdapterState, UnknownAdapterError
from deltafleet.serve.engine.backends import CpuBackend, make_backend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import AdditivePool, ElementwisePool, PoolSpec
from deltafleet.serve.engine.types import (
    NO_ADAPTER,
    EngineShutdownError,
    InvalidParameterError,
    PromptTooLongError,
    QueueFullError,
)
from tests.adapters.test_peft_equivalence import _peft_adapter_dir
from tests.conftest import assert_close, forward_chain
from tests.serve.conftest import ADAPTER_CONFIGS
from tests.serve.test_engine_correctness import make_engine

# ---------------------------------------------------------------------------------------------- peft oracle

PEFT_GENERATE_CASES = ["lora-r4-qv", "lora-r16-all-rslora", "lora-r8-mlp-layer1", "road_1", "road_4"]


@pytest.fixture(scope="module")
def peft_dirs(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    models = {case: _peft_adapter_dir(tiny_llama, case, d / case) for case in PEFT_GENERATE_CASES}
    return d, models


def test_mixed_batch_equals_transformers_peft_generate(tiny_llama, peft_dirs):
    """peft adapters (LoRA of three shapes, RoAd 1 and 4) and the base in one batch give peft's greedy tokens."""
    d, peft_models = peft_dirs
    engine = make_engine(tiny_llama, d, max_batch=12)
    prompts = [[5, 9, 77, 1, 30], [200, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    reqs = [Request(p, SamplingParams(max_tokens=7, ignore_eos=True), adapter=a)
            for a in [*PEFT_GENERATE_CASES, None] for p in prompts[: 2 if a is None else 3]][:12]
    outs = engine.generate(reqs)
    hf_base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    for r, o in zip(reqs, outs, strict=True):
        model = hf_base if r.adapter is None else peft_models[r.adapter]
        ids = torch.tensor([r.prompt_ids])
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=7,
                                  min_new_tokens=7, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert o.token_ids == want, r.adapter


def test_peft_adapter_names_mixed_batch_agrees(tiny_llama, peft_dirs):
    """peft's own mixed-batch forward (adapter_names=) gives the logits our mixed batch gives."""
    d, _ = peft_dirs
    cases = ["lora-r4-qv", "lora-r16-all-rslora"]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(d / cases[0]), adapter_name=cases[0])
    pm.load_adapter(str(d / cases[1]), adapter_name=cases[1])
    pm.eval()
    ids = torch.tensor([[5, 9, 77, 1], [200, 3, 4, 5], [7, 7, 7, 7]])
    names = [cases[0], "__base__", cases[1]]
    with torch.no_grad():
        want = pm(input_ids=ids, adapter_names=names).logits
    model, _ = load_model(tiny_llama)
    pools = {"lora": AdditivePool(PoolSpec("lora", ADDITIVE, 2, 16), model.config, torch.float32)}
    for slot, c in enumerate(cases):
        pools["lora"].write(slot, to_serving_form(load_adapter(d / c, model.config), torch.float32))
    layout = BatchLayout.build([(pools["lora"], 0), (None, NO_ADAPTER), (pools["lora"], 1)], ids.shape[1])
    with torch.no_grad():
        got = model(ids, hook=layout.hook(make_backend("cpu")))
    assert_close(got, want, "reordered", **forward_chain(model.config))


# ---------------------------------------------------------------------------------------------- backends

def _pools(cfg: ModelConfig, dtype):
    lora = AdditivePool(PoolSpec("lora", ADDITIVE, 5, 16), cfg, dtype)
    road = ElementwisePool(PoolSpec("road", ELEMENTWISE, 3, 64), cfg, dtype)
    for slot, name in enumerate(["lora-r2-qv", "lora-r8-all", "lora-r16-mlp", "lora-r4-ko", "delta-r6"]):
        lora.write(slot, to_serving_form(random_adapter(cfg, ADAPTER_CONFIGS[name], seed=slot), dtype))
    for slot, name in enumerate(["road1-all", "road2-qkv", "road4-mlp"]):
        road.write(slot, to_serving_form(random_adapter(cfg, ADAPTER_CONFIGS[name], seed=10 + slot), dtype))
    return lora, road


ROW_PATTERNS = {
    "distinct-decode": [("lora", 0), ("lora", 1), ("road", 0), (None, NO_ADAPTER), ("lora", 2), ("road", 2),
                        ("lora", 3), ("road", 1), ("lora", 4)],
    "one-adapter-many-rows": [("lora", 1)] * 12 + [("road", 0)] * 12,  # the segment path
    "skewed-with-base": [("lora", 2)] * 9 + [("lora", 0), (None, NO_ADAPTER), (None, NO_ADAPTER), ("road", 1)],
    "all-base": [(None, NO_ADAPTER)] * 4,
}


CPU_PATHS = {"native-or-grouped": {}, "grouped-mm": {"native": False},
             "segments-or-bmm": {"grouped": False, "native": False}}


@pytest.mark.parametrize("path", sorted(CPU_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", sorted(ROW_PATTERNS))
@pytest.mark.parametrize("tokens_per_row", [1, 3])
def test_cpu_backend_matches_reference(tiny_llama, dtype, pattern, tokens_per_row, path):
    model, _ = load_model(tiny_llama, dtype=dtype)
    lora, road = _pools(model.config, dtype)
    pools = {"lora": lora, "road": road, None: None}
    rows = [(pools[p], s) for p, s in ROW_PATTERNS[pattern]]
    layout = BatchLayout.build(rows, tokens_per_row)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (len(rows), tokens_per_row), generator=gen)
    with torch.no_grad():
        want = model(ids, hook=layout.hook(make_backend("reference")))
        got = model(ids, hook=layout.hook(CpuBackend(**CPU_PATHS[path])))
        if pattern != "all-base":
            assert not torch.allclose(want, model(ids), atol=1e-2)
    assert_close(got, want, "reordered" if dtype == torch.float32 else "rounded",
                 **forward_chain(model.config))


# ---------------------------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible_in_any_batch(tiny_llama, adapters_dir):
    engine = make_engine(tiny_llama, adapters_dir)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate([Request([1, 2, 3], params, adapter="lora-r8-all")])[0].token_ids
    others = [Request([9, 8, 7, i], SamplingParams(max_tokens=5, temperature=0.8, seed=i, ignore_eos=True),
                      adapter=n) for i, n in enumerate(["road1-all", None, "delta-r6"])]
    mixed = engine.generate([*others, Request([1, 2, 3], params, adapter="lora-r8-all")])[-1].token_ids
    assert alone == mixed
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert engine.generate([Request([1, 2, 3], other_seed, adapter="lora-r8-all")])[0].token_ids != alone


def test_top_k_one_is_greedy(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir)
    params = SamplingParams(max_tokens=6, temperature=1.5, top_k=1, seed=5, ignore_eos=True)
    out = engine.generate([Request([4, 4, 2], params, adapter="road2-qkv")])[0]
    assert out.token_ids == solo([4, 4, 2], 6, "road2-qkv")


# ---------------------------------------------------------------------------------------------- lifecycle

def test_abort_frees_the_batch_slot_and_adapter(tiny_llama, adapters_dir):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=2)
    long = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True), adapter="lora-r2-qv"))
    while not engine.running or not long.out:
        engine.step()
    engine.abort(long.req.request_id)
    engine.step()
    assert long.done.is_set() and long.result.finish_reason == FinishReason.ABORT
    assert engine.running == [] and engine.stats()["running"] == 0
    assert all(e.refs == 0 for e in engine.adapters.entries.values())


def test_remove_adapter_in_use_lets_running_requests_finish(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir)
    engine.add_adapter("extra", adapters_dir / "lora-r16-mlp")
    h = engine.submit(Request([6, 5, 4], SamplingParams(max_tokens=8, ignore_eos=True), adapter="extra"))
    while not h.out:
        engine.step()
    engine.remove_adapter("extra")
    with pytest.raises(UnknownAdapterError, match="extra"):
        engine.submit(Request([6, 5, 4], adapter="extra"))
    while not h.done.is_set():
        engine.step()
    assert h.result.finish_reason == FinishReason.LENGTH
    assert h.result.token_ids == solo([6, 5, 4], 8, "lora-r16-mlp")
    assert "extra" not in engine.adapters.names()


def test_kv_budget_caps_the_batch_and_the_rest_waits(tiny_llama, adapters_dir, solo):
    from deltafleet.models.llama import KVCache

    per_seq = KVCache.bytes_per_token(ModelConfig.from_file(tiny_llama / "config.json"), torch.float32) * 64
    engine = make_engine(tiny_llama, adapters_dir, kv_cache_bytes=3 * per_seq + 1, max_batch=32)
    assert engine.max_batch == 3
    reqs = [Request([i + 1, 2], SamplingParams(max_tokens=3, ignore_eos=True)) for i in range(7)]
    handles = [engine.submit(r) for r in reqs]
    peak = 0
    while not all(h.done.is_set() for h in handles):
        engine.step()
        peak = max(peak, len(engine.running))
    assert peak == 3
    assert all(h.result.token_ids == solo(r.prompt_ids, 3, None) for r, h in zip(reqs, handles, strict=True))


def test_async_stream_yields_each_token_and_early_exit_aborts(tiny_llama, adapters_dir):
    engine = make_engine(tiny_llama, adapters_dir)
    want = engine.generate([Request([3, 1, 4, 1, 5], SamplingParams(max_tokens=6, ignore_eos=True),
                                    adapter="road4-mlp")])[0]

    async def collect():
        events = [ev async for ev in engine.stream(
            Request([3, 1, 4, 1, 5], SamplingParams(max_tokens=6, ignore_eos=True), adapter="road4-mlp"))]
        stream = engine.stream(Request([2, 2], SamplingParams(max_tokens=50, ignore_eos=True), request_id="early"))
        async for _ in stream:
            break
        await stream.aclose()
        return events

    try:
        events = asyncio.run(collect())
        assert [e.token_id for e in events] == want.token_ids
        assert events[-1].finish_reason == FinishReason.LENGTH and events[-1].completion_tokens == 6
        assert all(e.finish_reason is None for e in events[:-1])
        for _ in range(200):
            if engine.stats()["running"] == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown(deadline=1)


# ---------------------------------------------------------------------------------------------- errors

def test_errors_name_the_rule(tiny_llama, adapters_dir):
    engine = make_engine(tiny_llama, adapters_dir, max_queue=2)
    with pytest.raises(PromptTooLongError, match="exceeds the context length 64"):
        engine.submit(Request(list(range(60)), SamplingParams(max_tokens=10)))
    with pytest.raises(UnknownAdapterError, match="'nope' not found"):
        engine.submit(Request([1], adapter="nope"))
    with pytest.raises(ValueError, match=r"prompt_ids: token ids must be in \[0, 320\)"):
        engine.submit(Request([1, 320]))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.submit(Request([1], SamplingParams(stop=("x",))))
    engine.submit(Request([1]))
    engine.submit(Request([2]))
    with pytest.raises(QueueFullError, match="queue full: 2"):
        engine.submit(Request([3]))
    engine.shutdown(deadline=5)
    with pytest.raises(EngineShutdownError):
        engine.submit(Request([1]))


@pytest.mark.parametrize("kw,match", [
    ({"max_tokens": 0}, "max_tokens=0"), ({"max_tokens": -3}, "max_tokens=-3"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"stop": ("",)}, "stop"),
])
def test_sampling_params_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_refusals_are_typed_and_name_their_field(tiny_llama, adapters_dir):
    engine = make_engine(tiny_llama, adapters_dir)
    cases = [(lambda: engine.submit(Request([1, 320])), "prompt_ids"),
             (lambda: engine.submit(Request([1], SamplingParams(stop=("x",)))), "stop"),
             (lambda: Request([]), "prompt_ids"),
             (lambda: SamplingParams(top_p=1.5), "top_p"),
             (lambda: SamplingParams(top_k=-2), "top_k")]
    engine.submit(Request([1], request_id="dup"))
    cases.append((lambda: engine.submit(Request([2], request_id="dup")), "request_id"))
    for make, field in cases:
        with pytest.raises(InvalidParameterError) as e:
            make()
        assert e.value.field == field and str(e.value).startswith(field)
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(temperature=2.5)
    assert (e.value.value, e.value.rule) == (2.5, "must be in [0, 2]")
    assert str(e.value) == "temperature=2.5: must be in [0, 2]" and isinstance(e.value, ValueError)


def test_adapter_state_is_typed_and_a_failed_load_keeps_its_error(tiny_llama, adapters_dir, tmp_path):
    engine = make_engine(tiny_llama, adapters_dir)
    states = engine.adapters.status
    assert states("lora-r2-qv") is AdapterState.ON_DISK
    engine.add_adapter("extra", adapters_dir / "lora-r8-all")
    engine.adapters.wait_loaded("extra", timeout=30)
    assert states("extra") is AdapterState.HOST_MEMORY
    engine.generate([Request([1, 2], SamplingParams(max_tokens=1), adapter="extra")])
    assert states("extra") is AdapterState.RESIDENT
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    engine.add_adapter("broken", broken)
    with pytest.raises(DeltafleetError, match="adapter_model.safetensors"):
        engine.adapters.wait_loaded("broken", timeout=30)
    assert states("broken") is AdapterState.FAILED
    rows = {r["name"]: r for r in engine.adapters.listing()}
    assert rows["broken"]["state"] is AdapterState.FAILED and "adapter_model.safetensors" in rows["broken"]["error"]
    assert rows["extra"]["state"] is AdapterState.RESIDENT and rows["extra"]["error"] is None
    assert rows["lora-r2-qv"]["state"] is AdapterState.ON_DISK and rows["lora-r2-qv"]["error"] is None


def test_engine_config_validation():
    with pytest.raises(ValueError, match="road_group_size=3"):
        EngineConfig(road_group_size=3)
    with pytest.raises(ValueError, match="adapter_dtype='int8'"):
        EngineConfig(adapter_dtype="int8")
    with pytest.raises(ValueError, match="backend='gpu'"):
        Engine(load_model_tiny(), None, EngineConfig(backend="gpu"))


def load_model_tiny():
    from deltafleet.models.llama import Transformer

    cfg = ModelConfig.from_hf_dict(dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        vocab_size=64, rms_norm_eps=1e-5, max_position_embeddings=64))
    return Transformer(cfg)


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.integration
def test_stop_strings_and_text_on_smollm2(smollm2_path):
    engine = Engine.from_pretrained(smollm2_path, config=EngineConfig(dtype="float32", max_model_len=256,
                                                                      max_batch=4))
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = tok.encode(text, add_special_tokens=False)
    full = engine.generate([Request(prompt, SamplingParams(max_tokens=24))])[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    words = full.text.split()
    assert len(words) >= 4, full.text
    stop = words[3]
    cut = engine.generate([Request(prompt, SamplingParams(max_tokens=24, stop=(stop,)))])[0]
    assert cut.finish_reason == FinishReason.STOP
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
