"""Every on-disk reader, fed hostile files derived from a valid artifact, returns or raises one of our documented
errors naming a file of the artifact: never another exception (a request that waits on a loader would hang).

CI-sized (`FUZZ`: a few dozen derandomized examples per reader); `make fuzz` runs the same targets for longer
under atheris (`fuzz/README.md`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.store.safetensors_io import ELEMENT_BITS, load_tensors, read_metadata, save_tensors
from tests.fuzz.artifacts import TARGETS, fresh_copy, model_config, rehash
from tests.fuzz.strategies import hostile_json_text, hostile_toml, mutated_bytes, mutated_safetensors

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_reader(name: str, d: Path) -> object | None:
    """The contract: a result, or a DeltafleetError whose message names a file of the artifact."""
    try:
        return TARGETS[name].read(d)
    except DeltafleetError as e:
        assert str(d) in str(e), f"the error names no file of the artifact: {e}"
        return None


def hostile_file(data, path: Path) -> st.SearchStrategy:
    """What a fuzzer writes in place of `path`: bytes shaped by its format, or raw mutated bytes."""
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        return st.one_of(mutated_bytes(raw), mutated_safetensors(raw), mutated_safetensors(raw))
    if path.suffix == ".json":
        return st.one_of(mutated_bytes(raw), hostile_json_text(json.loads(raw)).map(str.encode),
                         hostile_json_text(json.loads(raw)).map(str.encode))
    return hostile_toml(raw.decode())


@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(data=st.data())
def test_hostile_files_give_a_result_or_a_documented_error(seeds, name, data):
    target = TARGETS[name]
    with tempfile.TemporaryDirectory() as work:
        d = fresh_copy(seeds(name), Path(work))
        rel = data.draw(st.sampled_from(target.files), label="file")
        path = d / rel
        action = data.draw(st.sampled_from(["mutate"] * 8 + ["delete", "directory"]), label="action")
        if action == "delete":
            path.unlink()
        elif action == "directory":
            path.unlink()
            path.mkdir()
        else:
            path.write_bytes(data.draw(hostile_file(data, path), label="content"))
        if target.rehash and not rel.endswith(".json") and data.draw(st.integers(0, 4), label="rehash"):
            rehash(d)
        check_reader(name, d)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_valid_artifacts_still_load(seeds, name):
    assert check_reader(name, seeds(name)) is not None


# ---------------------------------------------------------------------------------------------- non-finite
WEIGHT_FILES = {name: [f for f in t.files if f.endswith(".safetensors")] for name, t in TARGETS.items()
                if name.startswith(("peft-", "deltafleet-", "delta-"))}


@pytest.mark.parametrize("name", sorted(WEIGHT_FILES))
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data())
def test_non_finite_adapter_weights_are_refused_naming_file_and_tensor(seeds, name, data):
    with tempfile.TemporaryDirectory() as work:
        d = fresh_copy(seeds(name), Path(work))
        path = d / data.draw(st.sampled_from(WEIGHT_FILES[name]), label="file")
        tensors = load_tensors(path)
        floats = sorted(k for k, t in tensors.items() if t.is_floating_point())
        key = data.draw(st.sampled_from(floats), label="tensor")
        flat = tensors[key].flatten()
        flat[data.draw(st.integers(0, flat.numel() - 1), label="index")] = data.draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value")
        tensors[key] = flat.reshape(tensors[key].shape)
        save_tensors(tensors, path)
        rehash(d)
        with pytest.raises(ArtifactError, match=rf"{path.name}: tensor '{key}' holds non-finite values"):
            TARGETS[name].read(d)


def test_non_finite_lora_tensor_is_named(seeds, tmp_path):
    """The issue's case: a LoRA adapter with a NaN weight fails at load, naming the file and the tensor."""
    from deltafleet.adapters import load_adapter

    d = fresh_copy(seeds("peft-lora"), tmp_path)
    w = d / "adapter_model.safetensors"
    tensors = load_tensors(w)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = float("nan")
    save_tensors(tensors, w)
    with pytest.raises(ArtifactError, match=rf"adapter_model\.safetensors: tensor '{key}' holds non-finite values"):
        load_adapter(d, model_config())


# ---------------------------------------------------------------------------------------------- valid files
_DTYPES = {name: dt for name, dt in [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
                                     ("F64", torch.float64), ("I64", torch.int64), ("I32", torch.int32),
                                     ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
                                     ("BOOL", torch.bool)]}
TENSORS = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(sorted(_DTYPES)), st.lists(st.integers(0, 4), max_size=3), st.integers(0, 2**16)),
    max_size=5)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(spec=TENSORS, metadata=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_any_file_the_writer_writes_reads_back_exactly(spec, metadata):
    """The header checks refuse nothing the writer writes: scalars, empty tensors, every dtype, metadata."""
    assert set(_DTYPES) <= set(ELEMENT_BITS)
    g = torch.Generator()
    tensors = {}
    for name, (dtype, shape, seed) in spec.items():
        g.manual_seed(seed)
        tensors[name] = (torch.randn(shape, generator=g, dtype=torch.float64) * 50).to(_DTYPES[dtype])
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "t.safetensors"
        save_tensors(tensors, path, metadata=metadata)
        got = load_tensors(path)
        assert read_metadata(path) == (metadata or {})
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
