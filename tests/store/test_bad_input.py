"""Bad input is refused with an error naming the file and the rule, and nothing is unpickled."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from peft import LoraConfig as PeftLora
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from deltafleet.adapters import load_adapter
from deltafleet.errors import ArtifactError, DeltafleetError, UnsupportedModelError
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_model
from deltafleet.store.safetensors_io import load_tensors, save_tensors


class _Boom:
    """Unpickling this would create a marker file: proof that nothing was unpickled if it is absent."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def peft_dir(tiny_llama, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    get_peft_model(hf, PeftLora(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(tmp_path / "a"))
    return tmp_path / "a"


@pytest.fixture
def model_cfg(tiny_llama):
    return ModelConfig.from_file(tiny_llama / "config.json")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_tensors({"x": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"w\.safetensors: truncated"):
        load_tensors(path)
    path.write_bytes(data[:5])
    with pytest.raises(ArtifactError, match="truncated"):
        load_tensors(path)


def test_malformed_safetensors_header(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(ArtifactError, match=r"w\.safetensors: malformed safetensors header"):
        load_tensors(path)


def test_pickle_disguised_as_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(ArtifactError, match="pickle"):
        load_tensors(path)
    assert not marker.exists()


def test_adapter_bin_is_refused_unopened(peft_dir, tmp_path):
    marker = tmp_path / "pwned"
    (peft_dir / "adapter_model.safetensors").unlink()
    (peft_dir / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(ArtifactError, match=r"adapter_model\.bin: pickle weight files are never loaded"):
        load_adapter(peft_dir)
    assert not marker.exists()


def test_checkpoint_with_only_pytorch_model_bin(tiny_llama, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ArtifactError, match=r"pytorch_model\.bin: pickle weight files are never loaded"):
        load_model(d)


def test_truncated_adapter_weights(peft_dir, model_cfg):
    w = peft_dir / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: truncated"):
        load_adapter(peft_dir, model_cfg)


def test_wrong_shape_adapter_tensor(peft_dir, model_cfg):
    w = peft_dir / "adapter_model.safetensors"
    tensors = load_tensors(w)
    key = next(k for k in tensors if "q_proj.lora_B" in k)
    tensors[key] = torch.zeros(96, 4)
    save_tensors(tensors, w)
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors: .*q_proj\.B has shape \(96, 4\), "
                                            r"expected \(128, 4\)"):
        load_adapter(peft_dir, model_cfg)


def test_wrong_shape_checkpoint_tensor(tiny_llama, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    w = d / "model.safetensors"
    tensors = load_tensors(w)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 128)
    save_tensors(tensors, w)
    with pytest.raises(ArtifactError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                                            r"has shape \(100, 128\), config implies \(256, 128\)"):
        load_model(d)


def test_missing_checkpoint_tensor(tiny_llama, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    w = d / "model.safetensors"
    tensors = load_tensors(w)
    del tensors["model.norm.weight"]
    save_tensors(tensors, w)
    with pytest.raises(ArtifactError, match="missing tensor 'model.norm.weight'"):
        load_model(d)


def test_unknown_target_module(peft_dir):
    cfg_path = peft_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "lm_head"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"adapter_config\.json: field 'target_modules' names unknown module "
                                            r"'lm_head'"):
        load_adapter(peft_dir)


def test_unknown_module_in_weights(peft_dir):
    w = peft_dir / "adapter_model.safetensors"
    tensors = load_tensors(w)
    tensors["base_model.model.model.layers.0.mlp.fc1.lora_A.weight"] = torch.zeros(4, 128)
    save_tensors(tensors, w)
    with pytest.raises(ArtifactError, match="targets unknown module mlp.fc1"):
        load_adapter(peft_dir)


@pytest.mark.parametrize("field,value,rule", [
    ("peft_type", "IA3", "peft_type='IA3' is not supported"),
    ("use_dora", True, "field 'use_dora'=True is not supported"),
    ("bias", "all", "field 'bias'='all' is not supported"),
    ("modules_to_save", ["lm_head"], "field 'modules_to_save'"),
])
def test_unsupported_peft_options(peft_dir, field, value, rule):
    cfg_path = peft_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=rule) as e:
        load_adapter(peft_dir)
    assert "adapter_config.json" in str(e.value)


def test_malformed_adapter_config(peft_dir):
    (peft_dir / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(ArtifactError, match=r"adapter_config\.json: not valid JSON"):
        load_adapter(peft_dir)


def test_not_an_adapter_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="not an adapter directory"):
        load_adapter(tmp_path)


def test_wrong_base_fingerprint(peft_dir, model_cfg):
    (peft_dir / "deltafleet.json").write_text(json.dumps(
        {"schema_version": 1, "kind": "lora", "base_fingerprint": "sha256:aaaa"}))
    with pytest.raises(ArtifactError, match="made for base sha256:aaaa, but the loaded base is sha256:bbbb"):
        load_adapter(peft_dir, model_cfg, expected_fingerprint="sha256:bbbb")


@pytest.mark.parametrize("model_type", ["gpt2", "bert", None])
def test_non_llama_checkpoint(tiny_llama, tmp_path, model_type):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: model_type=.* is not a Llama-family decoder"):
        load_model(d)


def test_unknown_base_name():
    with pytest.raises(DeltafleetError, match="neither an embedded model"):
        load_model("no-such-model-xyz")


@pytest.mark.parametrize("pad", [0, 1, 7])
def test_valid_file_whose_header_starts_with_0x80_loads(tmp_path, pad):
    """A header of length 128 mod 256 makes the file's first byte 0x80, the pickle PROTO opcode."""
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = tmp_path / "w.safetensors"
    for name_len in range(1, 300):
        save_tensors(tensors, path, metadata={"k": "x" * name_len, "pad": "y" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(load_tensors(path)["w"], tensors["w"])


def test_torch_save_zip_is_refused_as_pickle(tmp_path):
    path = tmp_path / "w.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match="pickle/zip"):
        load_tensors(path)
