"""The artifact on disk: round trip, and refusal of a wrong base, corrupted or truncated files, wrong shapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deltafleet.adapters import load_adapter
from deltafleet.adapters.delta_format import DELTA_FILE
from deltafleet.compress import CompressSettings, compress_deltas, load_extras, save_compressed
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.store.manifest import MANIFEST


@pytest.fixture(scope="module", params=["delta-come", "lowrank", "bitdelta", "dare"])
def artifact(request, tiny_deltas, tmp_path_factory):
    c = compress_deltas(tiny_deltas, CompressSettings(request.param, ratio=1 / 8, quantizer="rtn"))
    d = save_compressed(c, tmp_path_factory.mktemp(request.param), base_fingerprint="sha256:base")
    return c, d


def test_round_trip_is_exact_and_the_manifest_counts_the_stored_bytes(artifact, tiny_llama):
    c, d = artifact
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    a = load_adapter(d, cfg, expected_fingerprint="sha256:base")
    assert a.config == c.adapter.config and set(a.params) == set(c.adapter.params)
    for k, p in c.adapter.params.items():
        for n, t in p.items():
            assert torch.equal(a.params[k][n], t), (k, n)
    m = json.loads((d / MANIFEST).read_text())
    assert m["bytes"]["compressed"] == a.nbytes == c.bytes
    assert m["bytes"]["fp16_delta"] == c.fp16_bytes and m["method"] == c.settings.method
    assert sum(v["bytes"] for v in m["modules"].values()) + a.gains_nbytes == c.bytes
    assert sum(p["bytes"] for p in m["bytes"]["parts"].values()) == c.bytes
    assert set(m["bytes"]["parts"]) == {"projections", "tables", "gains"}
    assert m["bytes"]["parts"]["gains"]["bytes"] == m["bytes"]["parts"]["gains"]["fp16_bytes"] == 2 * 2 * 128
    assert sorted(m["gains"]) == ["layers.0.input_layernorm", "norm"] and set(a.gains) == set(c.adapter.gains)
    assert all(torch.equal(a.gains[k], g) for k, g in c.adapter.gains.items())
    assert {"embed_tokens", "lm_head"} <= set(m["modules"])  # the tiny base is untied: two tables
    # the whole delta within the ratio (BitDelta: 1 bit a weight, its scales and the gains above it)
    if c.settings.method != "bitdelta":
        assert c.bytes <= c.settings.ratio * c.fp16_bytes
    assert load_extras(d) == {} and m["extras"] == []  # a Llama fine-tune has nothing outside modules and gains


def test_other_base_is_refused(artifact):
    _, d = artifact
    with pytest.raises(ArtifactError, match="made for base sha256:base, but the loaded base is sha256:other"):
        load_adapter(d, expected_fingerprint="sha256:other")


def test_corrupted_and_truncated_files_are_refused_naming_the_file(artifact, tmp_path):
    _, src = artifact
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    data = bytearray((d / DELTA_FILE).read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the tensor data: the header still parses
    (d / DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{DELTA_FILE}: checksum mismatch"):
        load_adapter(d)
    (d / DELTA_FILE).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match=DELTA_FILE):
        load_adapter(d)


def test_wrong_shapes_are_refused(artifact, tmp_path):
    _, src = artifact
    d = tmp_path / "shape"
    shutil.copytree(src, d)
    m = json.loads((d / MANIFEST).read_text())
    m["modules"]["layers.0.q_proj"]["shape"] = [64, 128]  # k_proj's shape
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"layers.0.q_proj: parameter .* has shape"):
        load_adapter(d)


def test_a_model_of_another_shape_is_refused(artifact, tiny_checkpoints):
    _, d = artifact
    other = ModelConfig.from_file(tiny_checkpoints["llama3-rope-tied"] / "config.json")
    with pytest.raises(ArtifactError):
        load_adapter(d, other)


def test_modules_where_nothing_fits_are_dropped_and_listed(tiny_deltas, tmp_path):
    c = compress_deltas(tiny_deltas, CompressSettings("lowrank", ratio=1 / 256))
    dropped = [s for s in c.stats if s.bytes == 0]
    assert dropped and all(s.rel_error == 1.0 for s in dropped) and len(c.adapter.params) < len(c.stats)
    d = save_compressed(c, tmp_path / "lr256")
    m = json.loads((d / MANIFEST).read_text())
    assert len(m["dropped_modules"]) == len(dropped) and set(load_adapter(d).params) == set(c.adapter.params)


def _rewrite(src, d, edit_tensors=None, edit_manifest=None):
    """A copy of artifact `src` in `d` with its delta tensors and manifest edited, checksums made valid again (so
    the reader's other rules are what refuses it)."""
    from deltafleet.adapters.delta_format import sha256
    from deltafleet.store.safetensors_io import load_tensors, save_tensors

    shutil.copytree(src, d)
    tensors = load_tensors(d / DELTA_FILE)
    if edit_tensors:
        edit_tensors(tensors)
    save_tensors(tensors, d / DELTA_FILE)
    m = json.loads((d / MANIFEST).read_text())
    if edit_manifest:
        edit_manifest(m)
    m["files"][DELTA_FILE] = sha256(d / DELTA_FILE)
    (d / MANIFEST).write_text(json.dumps(m))
    return d


@pytest.mark.parametrize(("case", "edit_tensors", "edit_manifest", "rule"), [
    ("gain of a wrong shape", lambda t: t.update({"gains.norm": torch.zeros(7, dtype=torch.float16)}), None,
     r"gain delta norm has shape \(7,\), expected \(128,\)"),
    ("gain not listed", None, lambda m: m.update(gains=["norm"]), "gain deltas differ from the manifest's 'gains'"),
    ("gain of no norm", lambda t: t.update({"gains.layers.0.q_proj": torch.zeros(128, dtype=torch.float16)}), None,
     r"a gain delta is gains.layers.N"),
    ("gain a matrix", lambda t: t.update({"gains.norm": torch.zeros(2, 128, dtype=torch.float16)}), None,
     "one vector each"),
    ("gain out of range",
     lambda t: t.update({"gains.layers.7.input_layernorm": t.pop("gains.layers.0.input_layernorm")}),
     lambda m: m.update(gains=["layers.7.input_layernorm", "norm"]), "not an RMSNorm of this base"),
    ("gains field not a list", None, lambda m: m.update(gains="norm"), "field 'gains'='norm': must be a list"),
    ("non-finite gain", lambda t: t.update({"gains.norm": torch.full((128,), float("nan"), dtype=torch.float16)}), None,
     "non-finite"),
    ("unknown model-level tensor", lambda t: t.update({"final.x": torch.zeros(2)}), None,
     "not a projection parameter .* a table's"),
])
def test_hostile_whole_delta_artifacts_are_refused_naming_the_rule(tiny_deltas, tiny_llama, tmp_path, case,
                                                                  edit_tensors, edit_manifest, rule):
    c = compress_deltas(tiny_deltas, CompressSettings("lowrank", ratio=1 / 8))
    src = save_compressed(c, tmp_path / "src")
    d = _rewrite(src, tmp_path / "bad", edit_tensors, edit_manifest)
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    with pytest.raises(ArtifactError, match=rule):
        load_adapter(d, cfg)


def test_an_embedding_table_on_a_tied_base_is_refused(tiny_deltas, tiny_checkpoints, tmp_path):
    """A tied base has one table (lm_head): an artifact with an embed_tokens table was made for an untied base."""
    import dataclasses

    c = compress_deltas(tiny_deltas, CompressSettings("lowrank", ratio=1 / 8))
    d = save_compressed(c, tmp_path / "untied")
    cfg = dataclasses.replace(ModelConfig.from_file(tiny_deltas.base_path / "config.json"), tie_word_embeddings=True)
    with pytest.raises(ArtifactError, match="ties its LM head to the embedding"):
        load_adapter(d, cfg)


def test_dare_drops_a_table_whose_row_pointers_exceed_its_budget(tiny_deltas, tiny_llama, tmp_path):
    """At 1/64 a tiny table's CSR row pointers (4 bytes a row) cost more than its share of the budget: DARE keeps
    nothing of it (the delta is dropped, recorded as 0 bytes), the rest within the ratio; the artifact round-trips
    and merges."""
    c = compress_deltas(tiny_deltas, CompressSettings("dare", ratio=1 / 64))
    tables = [k for k in tiny_deltas.deltas if k[0] < 0]
    assert tables and not any(k in c.adapter.params for k in tables)
    assert all(st.bytes == 0 and st.rel_error == pytest.approx(1.0) for st in c.stats if st.layer < 0)
    assert any(k in c.adapter.params for k in tiny_deltas.deltas if k[0] >= 0)
    assert c.bytes <= c.settings.ratio * c.fp16_bytes
    d = save_compressed(c, tmp_path / "dare64", base_fingerprint="sha256:base")
    a = load_adapter(d, ModelConfig.from_file(tiny_llama / "config.json"), expected_fingerprint="sha256:base")
    assert set(a.params) == set(c.adapter.params)
