"""The inputs that made a reader raise something other than our documented errors (found by `tests/fuzz` and by
reading the readers), each now refused with an `ArtifactError` naming the file and the rule."""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
import torch

from deltafleet.adapters import load_adapter
from deltafleet.adapters.delta_format import load_compressed
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_model
from deltafleet.quant.base import read_quantized_base
from deltafleet.serve.http.tenancy import Tenancy
from deltafleet.store.manifest import read_manifest
from deltafleet.store.safetensors_io import load_tensors, read_metadata, save_tensors, stored_dtypes
from tests.fuzz.artifacts import TARGETS, model_config, rehash

DEEP_JSON = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5000  # past Python's 4300-digit limit for int(str)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    built = {}

    def seed(name):
        if name not in built:
            (root / name).mkdir()
            TARGETS[name].build(root / name)
            built[name] = root / name
        return built[name]

    return seed


@pytest.fixture
def copy(seeds, tmp_path):
    return lambda name: shutil.copytree(seeds(name), tmp_path / name)


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ---------------------------------------------------------------------------------------------- safetensors
def _write(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("header,data,rule", [
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, r"tensor 'w': data_offsets must be \[begin, end\]"),
    ({"w": None}, b"", r"tensor 'w': header entry must be an object, got None"),
    ({"w": [1, 2]}, b"", r"tensor 'w': header entry must be an object"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": []}}, b"\0" * 4, "data_offsets must be"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, None]}}, b"\0" * 4, "data_offsets must be"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets must be"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4, "data_offsets must be"),
    ({"w": {"dtype": [], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, r"dtype \[\] is not one of"),
    ({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", "dtype 'F4' is not one of"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape must be a list of"),
    ({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4,
     "needs more than bytes, its data_offsets span 4"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "overlaps the previous tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap before it at byte 0"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12, "8 bytes after the last tensor"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must be an object of strings"),
])
def test_malformed_header_entries_are_refused_naming_the_rule(tmp_path, header, data, rule):
    path = tmp_path / "w.safetensors"
    _write(path, header, data)
    for read in (load_tensors, stored_dtypes, read_metadata):
        with pytest.raises(ArtifactError, match=rf"w\.safetensors: .*{rule}"):
            read(path)


def test_thousands_of_huge_dimensions_are_refused_quickly(tmp_path):
    path = tmp_path / "w.safetensors"
    _write(path, {"w": {"dtype": "F32", "shape": [2**60] * 100_000, "data_offsets": [0, 4]}}, b"\0" * 4)
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match="needs more than bytes"):
        load_tensors(path)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("body", [DEEP_JSON.encode(), HUGE_INT.encode(), b"\xff\xfe{}"])
def test_header_that_breaks_the_json_parser(tmp_path, body):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ArtifactError, match="malformed safetensors header"):
        load_tensors(path)


def test_a_directory_where_a_file_should_be(tmp_path):
    (tmp_path / "w.safetensors").mkdir()
    with pytest.raises(ArtifactError, match=r"w\.safetensors: unreadable"):
        load_tensors(tmp_path / "w.safetensors")
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ArtifactError, match=r"config\.json: unreadable"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_no_tensors_and_empty_metadata_round_trip(tmp_path):
    """safetensors 0.8 writes an invalid header for ({}, metadata={}); save_tensors avoids it."""
    save_tensors({}, tmp_path / "e.safetensors", metadata={})
    assert load_tensors(tmp_path / "e.safetensors") == {}


# ---------------------------------------------------------------------------------------------- JSON files
@pytest.mark.parametrize("text,rule", [(DEEP_JSON, "not valid JSON \\(nested too deeply"), (HUGE_INT, "not valid JSON"),
                                       ('{"format": []}', r"field 'format'=\[\]: must be a string")])
def test_manifest_that_breaks_the_parser(tmp_path, text, rule):
    (tmp_path / "deltafleet.json").write_text(text)
    with pytest.raises(ArtifactError, match=rf"deltafleet\.json: {rule}"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("raw,rule", [(DEEP_JSON.encode(), "not valid JSON \\(nested too deeply"),
                                      (HUGE_INT.encode(), "not valid JSON"), (b"\x80{}", "unreadable")])
def test_config_json_that_breaks_the_parser(tmp_path, raw, rule):
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(ArtifactError, match=rf"config\.json: {rule}"):
        ModelConfig.from_file(tmp_path / "config.json")


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("field,value,rule", [
    ("peft_type", [], r"peft_type=\[\] is not supported"),
    ("r", float("inf"), "field 'r'=inf: must be an integer"),  # int(inf) raised OverflowError
    ("r", 2.5, "field 'r'=2.5: must be an integer"),  # was silently truncated to 2
    ("r", True, "field 'r'=True: must be an integer"),
    ("lora_alpha", float("nan"), "field 'lora_alpha'=nan: must be a finite number"),  # was accepted
    ("lora_alpha", 10**400, "field 'lora_alpha'=.*: must be a finite number"),  # float() raised OverflowError
    ("use_rslora", "yes", "field 'use_rslora'='yes': must be true or false"),
])
def test_peft_config_field_of_the_wrong_type(copy, field, value, rule):
    d = copy("peft-lora")
    _edit_json(d / "adapter_config.json", lambda c: c.__setitem__(field, value))
    with pytest.raises(ArtifactError, match=rf"adapter_config\.json: {rule}"):
        load_adapter(d, model_config())


def test_road_group_size_past_float_range(copy):
    d = copy("peft-road")
    _edit_json(d / "adapter_config.json", lambda c: c.__setitem__("group_size", float("inf")))
    with pytest.raises(ArtifactError, match="field 'group_size'=inf: must be an integer"):
        load_adapter(d)


@pytest.mark.parametrize("edit,rule", [
    (lambda m: m.__setitem__("format", []), r"field 'format'=\[\]: must be a string"),  # unhashable in a Registry
    (lambda m: m.__setitem__("config", None), "missing field 'config'"),
    (lambda m: m.__setitem__("config", [1]), r"field 'config'=\[1\]: must be an object"),  # AttributeError
    (lambda m: m["config"].__setitem__("rank", True), "field 'config': rank=True: must be a positive integer"),
    (lambda m: m.__setitem__("kind", "nope"), "field 'kind': unknown adapter kind 'nope'"),
])
def test_deltafleet_manifest_field_of_the_wrong_type(copy, edit, rule):
    d = copy("deltafleet-lowrank")
    _edit_json(d / "deltafleet.json", edit)
    with pytest.raises(ArtifactError, match=rf"deltafleet\.json: {rule}"):
        load_adapter(d)


def test_layer_index_past_the_digit_limit(copy):
    d = copy("peft-lora")
    w = d / "adapter_model.safetensors"
    tensors = load_tensors(w)
    tensors[f"base_model.model.model.layers.{'9' * 5000}.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_tensors(tensors, w)
    with pytest.raises(ArtifactError, match="is not a decoder-layer projection parameter"):
        load_adapter(d)


@pytest.mark.parametrize("edit,rule", [
    (lambda m: m["modules"].__setitem__("layers.0.q_proj", {"shape": []}),
     r"modules\['layers.0.q_proj'\]: needs a 'shape' \[out, in\]"),
    (lambda m: m["modules"].__setitem__("layers.0.q_proj", {"shape": ["a", "b"]}), "modules.*: needs a 'shape'"),
    (lambda m: m.__setitem__("modules", None), "missing field 'modules'"),
    (lambda m: m.__setitem__("files", []), "field 'files' lists no checksum for delta.safetensors"),
    (lambda m: m["files"].__setitem__("delta.safetensors", 5), "field 'files' lists no checksum"),
    (lambda m: m.__setitem__("extras", {"a": 1}), "field 'extras'=.*: must be a list of objects"),
    (lambda m: m.__setitem__("extras", [None]), "field 'extras'=.*: must be a list of objects"),
    (lambda m: m["config"]["bands"].__setitem__("axb", [[4, 1]]),
     "field 'config': bands: key 'axb' must be a projection shape"),
    (lambda m: m["config"].__setitem__("group_size", float("inf")), "field 'config': cannot convert float infinity"),
])
def test_compressed_manifest_field_of_the_wrong_type(copy, edit, rule):
    d = copy("delta-qlowrank")
    _edit_json(d / "deltafleet.json", edit)
    with pytest.raises(ArtifactError, match=rf"deltafleet\.json: {rule}"):
        load_compressed(d)


def test_qlowrank_zero_points_out_of_range_are_refused_at_load(copy):
    """Served from the stored form, a qlowrank adapter used to fail only when written into a slot, mid-batch."""
    d = copy("delta-qlowrank")
    w = d / "delta.safetensors"
    tensors = load_tensors(w)
    key = "layers.0.v_proj.b0.V.qzero"
    tensors[key] = torch.full_like(tensors[key], 255)  # 2-bit band: zero points must be < 4
    save_tensors(tensors, w)
    rehash(d)
    with pytest.raises(ArtifactError, match=r"delta\.safetensors: layers\.0\.v_proj: .*qzero holds zero points"):
        load_adapter(d, model_config())


# ---------------------------------------------------------------------------------------------- bases
@pytest.mark.parametrize("edit,rule", [
    (lambda m: m.__setitem__("dense_dtype", []), r"dense_dtype=\[\]: must be one of"),  # unhashable in a dict
    (lambda m: m.__setitem__("quantized_tables", ["lm_head", "lm_head"]),
     "quantized_tables=.*: must list distinct tables"),
])
def test_quantized_base_manifest_field_of_the_wrong_type(copy, edit, rule):
    d = copy("quantized-base")
    _edit_json(d / "base" / "deltafleet.json", edit)
    with pytest.raises(ArtifactError, match=rf"deltafleet\.json: {rule}"):
        read_quantized_base(d / "base")


@pytest.mark.parametrize("field,value,rule", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0}, "rope low_freq_factor=0"),
    ("rope_scaling", {"rope_type": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 4.0}, "must be <"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("nan")}, "rope theta=nan: must be a finite"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps=nan"),
    ("vocab_size", 2**62, "more than a tensor can hold"),  # meta construction raised RuntimeError
    ("num_attention_heads", float("inf"), "invalid value"),  # int(inf) raised OverflowError
    ("num_attention_heads", 0, "invalid value"),  # hidden // 0 raised ZeroDivisionError (found by atheris)
    ("eos_token_id", "</s>", "eos_token_id='</s>': must be a token id"),
])
def test_checkpoint_config_out_of_range(copy, field, value, rule):
    d = copy("checkpoint")
    _edit_json(d / "config.json", lambda c: c.__setitem__(field, value))
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match=rf"config\.json: .*{rule}"):
        load_model(d)
    assert time.perf_counter() - t0 < 5.0


def test_a_million_layers_in_config_json_is_refused_before_building_them(copy):
    """The expected names were built first: a million layers on the meta device take about 20 minutes."""
    d = copy("checkpoint")
    _edit_json(d / "config.json", lambda c: c.__setitem__("num_hidden_layers", 10**6))
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match=r"checkpoint: missing the tensors of layer 2 .*num_hidden_layers=1000000"):
        load_model(d)
    assert time.perf_counter() - t0 < 5.0


def test_manifest_format_of_the_wrong_type_in_a_base_directory(copy):
    d = copy("checkpoint")
    (d / "deltafleet.json").write_text('{"schema_version": 1, "format": ["deltafleet-quantized-base"]}')
    with pytest.raises(ArtifactError, match=r"deltafleet\.json: field 'format'"):
        load_model(d)


# ---------------------------------------------------------------------------------------------- tenancy
@pytest.mark.parametrize("text,rule", [("a = " + "[" * 50_000 + "]" * 50_000, "not valid TOML \\(nested too deeply"),
                                       ("a = " + HUGE_INT, "not valid TOML")])
def test_tenancy_toml_that_breaks_the_parser(tmp_path, text, rule):
    (tmp_path / "tenancy.toml").write_text(text)
    with pytest.raises(ArtifactError, match=rf"tenancy\.toml: {rule}"):
        Tenancy.from_file(tmp_path / "tenancy.toml")


# ---------------------------------------------------------------------------------------------- tensor values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("size", [7, (1 << 16) + 1])  # checked inside a concatenation, and alone
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_tensor_among_many(tmp_path, dtype, size, bad):
    """A thousand clean small tensors of several dtypes, integer codes, and one bad value in one tensor: the error
    names that tensor (the clean ones are checked in one pass per dtype)."""
    from deltafleet.store.safetensors_io import check_finite

    gen = torch.Generator().manual_seed(0)
    tensors = {f"m{i}.{n}": torch.randn(5, generator=gen).to(dt) for i in range(300)
               for n, dt in (("a", torch.float32), ("b", torch.float16), ("c", torch.bfloat16))}
    tensors |= {f"m{i}.codes": torch.randint(0, 255, (9,), dtype=torch.uint8) for i in range(300)}
    check_finite(tensors, tmp_path / "x.safetensors")
    if dtype == torch.float8_e4m3fn and bad == bad:
        pytest.skip("float8_e4m3fn has NaN but no infinity")
    victim = torch.zeros(size).to(dtype)
    victim[size // 2] = bad
    tensors["m150.victim"] = victim
    with pytest.raises(ArtifactError, match=r"x\.safetensors: tensor 'm150\.victim' holds non-finite values"):
        check_finite(tensors, tmp_path / "x.safetensors")
