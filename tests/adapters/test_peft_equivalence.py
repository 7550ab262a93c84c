"""Adapters written by peft load into deltafleet and give peft's logits; ours load back into peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import PeftModel, get_peft_model
from peft import RoadConfig as PeftRoad
from transformers import AutoModelForCausalLM

from deltafleet.adapters import (
    LoraConfig,
    RoadConfig,
    load_adapter,
    merge_adapter,
    random_adapter,
    save_adapter,
    unmerge_adapter,
)
from deltafleet.models.loading import load_model
from tests.conftest import assert_close, forward_chain, token_batch

PEFT_CASES = {
    "lora-r4-qv": lambda: PeftLora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora-r16-all-rslora": lambda: PeftLora(r=16, lora_alpha=32, use_rslora=True, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]),
    "lora-r8-mlp-layer1": lambda: PeftLora(r=8, lora_alpha=16, target_modules=["gate_proj", "down_proj"],
                                           layers_to_transform=[1], init_lora_weights=False),
    "road_1": lambda: PeftRoad(variant="road_1", group_size=64, init_weights=False,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]),
    "road_2": lambda: PeftRoad(variant="road_2", group_size=32, init_weights=False,
                               target_modules=["q_proj", "v_proj", "up_proj"]),
    "road_4": lambda: PeftRoad(variant="road_4", group_size=64, init_weights=False,
                               target_modules=["o_proj", "down_proj"]),
}


def _peft_adapter_dir(base_path, case, out):
    torch.manual_seed(7)
    hf = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    peft_model = get_peft_model(hf, PEFT_CASES[case]()).eval()
    if case.startswith("lora"):  # peft's init_lora_weights=False still leaves B small; make it matter
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    peft_model.save_pretrained(str(out))
    return peft_model


def _ids(cfg):
    return token_batch(cfg.vocab_size, 3, 11, seed=5)


@pytest.mark.parametrize("base_name", ["llama", "qwen2-bias"])
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_gives_peft_logits(tiny_checkpoints, tmp_path, base_name, case):
    base_path = tiny_checkpoints[base_name]
    peft_model = _peft_adapter_dir(base_path, case, tmp_path / "a")
    model, _ = load_model(base_path)
    adapter = load_adapter(tmp_path / "a", model.config)
    ids = _ids(model.config)
    with torch.no_grad():
        want = peft_model(ids).logits
        base = model(ids)
        got = model(ids, hook=adapter.hook())
        assert not torch.allclose(want, base, atol=1e-3), "adapter must change the output"
        chain = forward_chain(model.config)
        assert_close(got, want, "reordered", **chain)
        merge_adapter(model, adapter)
        assert_close(model(ids), want, "reordered", **chain)
        unmerge_adapter(model, adapter)
        assert_close(model(ids), base, "reordered", **chain)


@pytest.mark.parametrize("config", [
    LoraConfig(r=6, alpha=12.0, targets=("q_proj", "up_proj")),
    LoraConfig(r=2, alpha=4.0, use_rslora=True, targets=("k_proj", "o_proj", "down_proj")),
    RoadConfig(variant="road_1", group_size=64, targets=("q_proj", "gate_proj")),
    RoadConfig(variant="road_2", group_size=16, targets=("v_proj",)),
    RoadConfig(variant="road_4", group_size=32, targets=("k_proj", "down_proj")),
], ids=lambda c: f"{c.kind}-{'-'.join(c.targets)}")
@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "layer1"])
def test_our_adapter_loads_into_peft(tiny_llama, tmp_path, config, layers):
    model, _ = load_model(tiny_llama)
    adapter = random_adapter(model.config, config, seed=3, layers=layers)
    save_adapter(adapter, tmp_path / "ours", model_cfg=model.config)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    ids = _ids(model.config)
    with torch.no_grad():
        want = peft_model(ids).logits
        got = model(ids, hook=adapter.hook())
        assert not torch.allclose(got, model(ids), atol=1e-3)
    assert_close(got, want, "reordered", **forward_chain(model.config))


@pytest.mark.integration
@pytest.mark.parametrize("case", ["lora-r4-qv", "road_1"])
def test_smollm2_peft_adapter(smollm2_path, tmp_path, case):
    peft_model = _peft_adapter_dir(smollm2_path, case, tmp_path / "a")
    model, _ = load_model(smollm2_path)
    adapter = load_adapter(tmp_path / "a", model.config)
    ids = _ids(model.config)[:, :6]
    with torch.no_grad():
        want = peft_model(ids).logits
        got = model(ids, hook=adapter.hook())
    assert_close(got, want, "reordered", **forward_chain(model.config))
