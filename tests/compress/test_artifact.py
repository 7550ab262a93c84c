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
    assert sum(v["bytes"] for v in m["modules"].values()) == c.bytes
    extras = load_extras(d)
    assert list(extras) == ["model.layers.0.input_layernorm.weight"] == [e["name"] for e in m["extras"]]


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
