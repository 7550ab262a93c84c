"""A quantized-base directory: loads into our model (equal to the dequantized dense model), into transformers
(equal logits), reports its bytes, and refuses malformed files naming them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deltafleet.errors import ArtifactError
from deltafleet.models.llama import Transformer
from deltafleet.models.loading import load_model
from deltafleet.quant.base import MANIFEST, WEIGHTS, is_quantized_base, load_quantized_model, read_quantized_base
from deltafleet.quant.linear import QuantLinear
from deltafleet.quant.pipeline import quantize_base
from deltafleet.store.safetensors_io import load_tensors, save_tensors
from tests.conftest import assert_close, forward_chain, token_batch
from tests.quant.conftest import tiny_config


def _dense_model(path) -> Transformer:
    qb = read_quantized_base(path)
    with torch.device("meta"):
        model = Transformer(qb.config)
    model.load_state_dict(qb.dequantized_state_dict(), strict=False, assign=True)
    model.tie_weights()
    from deltafleet.models.llama import rope_inv_freq

    model.inv_freq = rope_inv_freq(qb.config.rope, qb.config.head_dim)
    return model.eval()


@pytest.mark.parametrize("method", ["rtn", "gptq", "loftq"])
def test_quantized_model_equals_dense_model_with_dequantized_weights(quantized_tiny, tiny_llama, method):
    path = quantized_tiny[method]
    assert is_quantized_base(path) and not is_quantized_base(tiny_llama)
    model, got_path = load_model(path)
    assert got_path == path
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * model.config.num_layers
    ids = token_batch(model.config.vocab_size, 3, 11)
    with torch.no_grad():
        got = model(ids)
        want = _dense_model(path)(ids)
        full = load_model(tiny_llama)[0](ids)
    assert_close(got, want, "reordered", **forward_chain(model.config))
    assert (got - full).abs().max() > 1e-3  # really quantized: differs from the full-precision base
    assert (got - full).abs().mean() < 0.4 * full.abs().mean()  # ... but close to it at 4 bits


def test_bias_projections_and_tied_embeddings(tiny_checkpoints, tmp_path):
    for name in ("qwen2-bias", "llama3-rope-tied"):
        d = tmp_path / name
        quantize_base(tiny_checkpoints[name], tiny_config("rtn", 3), d, dense_dtype="float32")
        model = load_quantized_model(d)
        ids = token_batch(model.config.vocab_size, 2, 9)
        with torch.no_grad():
            assert_close(model(ids), _dense_model(d)(ids), "reordered", **forward_chain(model.config))


def test_transformers_model_has_the_dequantized_weights(quantized_tiny):
    from deltafleet.quant.base import hf_causal_lm

    path = quantized_tiny["rtn"]
    hf = hf_causal_lm(path)
    ids = token_batch(320, 2, 10)
    with torch.no_grad():
        ours = load_model(path)[0]
        assert_close(hf(ids).logits, ours(ids), "reordered", **forward_chain(ours.config))


def test_manifest_and_bytes(quantized_tiny):
    m = json.loads((quantized_tiny["rtn"] / MANIFEST).read_text())
    assert m["schema_version"] == 1 and m["method"] == "rtn" and m["bits"] == 4 and m["group_size"] == 32
    assert m["source"]["fingerprint"].startswith("sha256:")
    b = m["bytes"]
    # 4 bits + (fp16 scale + uint8 zero) per 32 weights = 0.594 bytes per weight vs 2 in bf16
    assert b["projections"] <= 0.3 * b["projections_bf16"]
    assert b["total"] == b["projections"] + b["dense"]
    assert (quantized_tiny["loftq"] / "lora_init" / "adapter_config.json").is_file()
    assert m["lora_init"] is None


def test_engine_dtype_bf16_loads(quantized_tiny):
    model, _ = load_model(quantized_tiny["gptq"], dtype=torch.bfloat16)
    ids = token_batch(320, 2, 6)
    with torch.no_grad():
        assert_close(model(ids).float(), load_model(quantized_tiny["gptq"])[0](ids), "rounded", torch.bfloat16,
                     **forward_chain(model.config))


@pytest.fixture
def broken(quantized_tiny, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(quantized_tiny["rtn"], d)
    return d


def test_wrong_bits_in_manifest_refused(broken):
    m = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**m, "bits": 3}))
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS}.*qcodes.*bits=3"):
        load_model(broken)
    (broken / MANIFEST).write_text(json.dumps({**m, "bits": 5}))
    with pytest.raises(ArtifactError, match=rf"{MANIFEST}: bits=5"):
        load_model(broken)


def test_truncated_weights_refused(broken):
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS}: truncated"):
        load_model(broken)


@pytest.mark.parametrize("drop", ["model.layers.1.mlp.down_proj.qscale", "model.norm.weight"])
def test_missing_tensor_refused(broken, drop):
    tensors = load_tensors(broken / WEIGHTS)
    del tensors[drop]
    save_tensors(tensors, broken / WEIGHTS)
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS}: tensor '{drop}' is missing"):
        load_model(broken)


def test_output_dir_holding_a_base_refused(quantized_tiny, tiny_llama):
    with pytest.raises(ArtifactError, match="already holds"):
        quantize_base(tiny_llama, tiny_config("rtn", 4), quantized_tiny["rtn"])
