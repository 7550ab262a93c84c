"""`--embedding rtn`: the embedding table (and an untied LM head) stored quantized. Rows gathered from the packed
table equal the dequantized table; a tied LM head shares the embedding's buffers; our model equals transformers
on the dequantized checkpoint and the engine equals greedy generation; malformed manifests are refused."""

from __future__ import annotations

import json

import pytest
import torch

from deltafleet.errors import ArtifactError
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.quant.base import MANIFEST, WEIGHTS, hf_causal_lm, load_quantized_model, read_quantized_base
from deltafleet.quant.linear import QuantEmbedding, QuantLinear
from deltafleet.quant.pipeline import quantize_base
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.store.quantized import QuantizedMatrix
from deltafleet.store.safetensors_io import load_tensors, save_tensors
from tests.conftest import assert_close, forward_chain, token_batch
from tests.quant.conftest import tiny_config


@pytest.mark.parametrize("cols,bits", [(64, 4), (64, 3), (40, 2), (37, 3), (33, 8)])
def test_embedding_rows_equal_the_dequantized_table(cols, bits):
    w = torch.randn(50, cols, generator=torch.Generator().manual_seed(cols + bits))
    qm = QuantizedMatrix.quantize(w, bits, 16)
    emb = QuantEmbedding(qm)
    ids = torch.tensor([[3, 49, 3, 0], [7, 7, 12, 48]])
    want = qm.dequantize()[ids]
    assert torch.equal(emb(ids), want)  # same fp32 arithmetic: exact, packed rows or whole-table fallback
    assert emb.to(torch.bfloat16)(ids).dtype == torch.bfloat16
    # the table as a linear layer: each output sums one product by 1.0 and exact zeros
    assert_close(emb.table(torch.eye(cols)), qm.dequantize().t(), "exact")


@pytest.fixture(scope="module")
def table_bases(tiny_checkpoints, tmp_path_factory) -> dict:
    out = {}
    for name in ("llama", "llama3-rope-tied"):  # untied and tied LM head
        d = tmp_path_factory.mktemp(f"qt-{name}") / "base"
        quantize_base(tiny_checkpoints[name], tiny_config("rtn", 4, embedding="rtn"), d, dense_dtype="float32")
        out[name] = d
    return out


@pytest.mark.parametrize("name", ["llama", "llama3-rope-tied"])
def test_quantized_tables_load_and_match_transformers(table_bases, tiny_checkpoints, name):
    d = table_bases[name]
    m = json.loads((d / MANIFEST).read_text())
    tied = read_quantized_base(d).config.tie_word_embeddings
    assert m["quantized_tables"] == (["model.embed_tokens"] if tied else ["lm_head", "model.embed_tokens"])
    assert m["settings"]["embedding"] == "rtn"
    b = m["bytes"]
    assert b["tables"] > 0 and b["total"] == b["projections"] + b["tables"] + b["dense"]
    model = load_quantized_model(d)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert (model.lm_head is model.model.embed_tokens.table) == tied  # tied: one copy of the table
    ids = token_batch(model.config.vocab_size, 2, 9)
    with torch.no_grad():
        got = model(ids)
        assert_close(got, hf_causal_lm(d)(ids).logits, "reordered", **forward_chain(model.config))
        full = load_model(tiny_checkpoints[name])[0](ids)
    assert (got - full).abs().max() > 1e-3 and (got - full).abs().mean() < 0.4 * full.abs().mean()


def test_engine_on_quantized_tables_equals_greedy(table_bases):
    model = load_quantized_model(table_bases["llama3-rope-tied"])
    engine = Engine(load_quantized_model(table_bases["llama3-rope-tied"]), None,
                    EngineConfig(dtype="float32", max_model_len=32, max_batch=4))
    prompts = [[1, 2, 3], [40, 9, 100, 7, 7], [250]]
    outs = engine.generate([Request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts])
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == greedy_generate(model, p, 6)


def test_unknown_or_missing_table_refused(table_bases, tmp_path):
    import shutil

    d = tmp_path / "b"
    shutil.copytree(table_bases["llama"], d)
    m = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**m, "quantized_tables": ["model.norm"]}))
    with pytest.raises(ArtifactError, match="quantized_tables"):
        read_quantized_base(d)
    (d / MANIFEST).write_text(json.dumps(m))
    tensors = load_tensors(d / WEIGHTS)
    tensors.pop("model.embed_tokens.qscale")
    save_tensors(tensors, d / WEIGHTS)
    with pytest.raises(ArtifactError, match=r"model\.embed_tokens\.qscale"):
        read_quantized_base(d)
