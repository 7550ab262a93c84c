"""Hypothesis strategies for hostile files: mutated bytes, mutated JSON documents, mutated safetensors headers and
random TOML, each starting from a valid file."""

from __future__ import annotations

import copy
import json
import struct
from typing import Any

from hypothesis import strategies as st

# Integers a reader must survive: negatives, zero, int32/int64/uint64 edges, past float range, past int64.
HOSTILE_INTS = st.one_of(st.integers(-3, 300), st.sampled_from(
    [-1, -(2**31), 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30, 10**400]))
HOSTILE_STRS = st.one_of(st.text(max_size=12), st.sampled_from(
    ["", "x" * 300, "\x00", "\ud7ff", "layers.0.q_proj", "q_proj", "lora", "road", "qlowrank", "sparse", "LORA",
     "ROAD", "F32", "peft", "deltafleet", "deltafleet-delta", "deltafleet-quantized-base", "32x32", "-1x5",
     "0x0", "llama", "llama3", "float32", "model.embed_tokens", "*", "all-linear"]))
SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_INTS, st.floats(allow_nan=True, allow_infinity=True),
                    HOSTILE_STRS)
JSON_VALUES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(HOSTILE_STRS, c, max_size=4)), max_leaves=12)
# Field names the readers know, so that added keys hit real fields as well as unknown ones.
FIELD_NAMES = st.sampled_from([
    "schema_version", "format", "kind", "config", "targets", "r", "alpha", "use_rslora", "rank", "variant",
    "group_size", "bands", "u_groups", "nnz", "modules", "shape", "files", "extras", "name", "base_fingerprint",
    "peft_type", "lora_alpha", "target_modules", "bias", "use_dora", "bits", "dense_dtype", "quantized_tables",
    "codec", "sign", "qsigns", "qin", "qout", "gains",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_parameters", "rope_scaling", "rope_theta", "rms_norm_eps",
    "eos_token_id", "bos_token_id", "tie_word_embeddings", "max_position_embeddings", "model_type", "hidden_act",
    "dtype", "data_offsets", "__metadata__", "tenants", "api_key", "api_key_env", "adapters", "admin"])
DTYPE_NAMES = st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32",
                                         "U64", "BOOL", "C64", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "F8_E8M0",
                                         "f32", "", "X"]), JSON_VALUES)


# ------------------------------------------------------------------------------------------------ bytes
@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """1-3 of: truncate, flip bytes, overwrite a span, insert, delete a span, or replace everything."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "replace"]))
        i = draw(st.integers(0, len(out)))
        if op == "truncate":
            del out[i:]
        elif op == "flip" and out:
            for j in draw(st.lists(st.integers(0, len(out) - 1), min_size=1, max_size=8)):
                out[j] ^= draw(st.integers(1, 255))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[i:i + len(chunk)] = chunk
        elif op == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[i:i + draw(st.integers(1, 64))]
        elif op == "replace":
            out = bytearray(draw(st.binary(max_size=64)))
    return bytes(out)


# ------------------------------------------------------------------------------------------------ JSON
def _containers(node: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every dict and list inside a JSON document (the root included)."""
    found = [path] if isinstance(node, dict | list) else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in children:
        found += _containers(v, (*path, k))
    return found


def _at(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node


@st.composite
def mutated_json(draw, doc: Any) -> Any:
    """1-4 edits of a JSON document: replace, delete or add a member anywhere, or replace the document."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 4))):
        paths = _containers(doc)
        if not paths or draw(st.integers(0, 15)) == 15:
            doc = draw(JSON_VALUES)
            continue
        node = _at(doc, draw(st.sampled_from(paths)))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if op == "add" or not keys:
            if isinstance(node, dict):
                node[draw(st.one_of(FIELD_NAMES, HOSTILE_STRS))] = draw(JSON_VALUES)
            else:
                node.append(draw(JSON_VALUES))
        elif op == "delete":
            del node[draw(st.sampled_from(keys))]
        else:
            node[draw(st.sampled_from(keys))] = draw(JSON_VALUES)
    return doc


@st.composite
def hostile_json_text(draw, doc: Any) -> str:
    """The text of a mutated document (NaN and Infinity included, as Python's json reads them), or one of the
    texts that break naive parsers: deep nesting, an integer past Python's digit limit, not UTF-8-clean."""
    if draw(st.integers(0, 9)) == 9:
        return draw(st.sampled_from(["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000,
                                     "9" * 5000, '{"schema_version": ' + "1" * 5000 + "}", "", "null", "[]"]))
    return json.dumps(draw(mutated_json(doc)), allow_nan=True)


# ------------------------------------------------------------------------------------------------ safetensors
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


@st.composite
def hostile_entry(draw, header: dict, data_len: int) -> dict:
    """A tensor entry with hostile offsets (negative, reversed, overlapping another, out of range), shape (huge,
    negative, wrong types) or dtype (unknown, wrong type), or a member missing or of the wrong type."""
    entry = copy.deepcopy(draw(st.sampled_from([v for k, v in header.items() if k != "__metadata__"])))
    offset = st.one_of(st.integers(-2, data_len + 2), HOSTILE_INTS)
    field = draw(st.sampled_from(["data_offsets", "shape", "dtype", "missing", "type"]))
    if field == "data_offsets":
        others = [v["data_offsets"] for v in header.values() if isinstance(v, dict) and "data_offsets" in v]
        entry["data_offsets"] = draw(st.one_of(st.lists(offset, min_size=0, max_size=3), st.sampled_from(others),
                                               JSON_VALUES))
    elif field == "shape":
        entry["shape"] = draw(st.one_of(st.lists(st.one_of(HOSTILE_INTS, st.integers(0, 9)), max_size=5),
                                        JSON_VALUES))
    elif field == "dtype":
        entry["dtype"] = draw(DTYPE_NAMES)
    elif field == "missing":
        del entry[draw(st.sampled_from(sorted(entry)))]
    else:
        entry = draw(JSON_VALUES)
    return entry


@st.composite
def mutated_safetensors(draw, data: bytes) -> bytes:
    """A safetensors file whose header is mutated as JSON (tensor entries and metadata), re-serialised with a
    correct or a wrong length, over the original, a truncated or an extended data buffer."""
    header, buffer = split_safetensors(data)
    if draw(st.booleans()):
        names = [k for k in header if k != "__metadata__"]
        key = draw(st.one_of(st.sampled_from(names), HOSTILE_STRS))
        header[key] = draw(hostile_entry(header, len(buffer)))
    else:
        header = draw(mutated_json(header))
    text = json.dumps(header, allow_nan=True).encode()
    n = len(text) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 8, -(len(text)), 2**40]))
    tail = draw(st.sampled_from(["same", "same", "truncated", "extended"]))
    if tail == "truncated":
        buffer = buffer[: draw(st.integers(0, max(len(buffer) - 1, 0)))]
    elif tail == "extended":
        buffer += draw(st.binary(min_size=1, max_size=32))
    return struct.pack("<Q", max(n, 0)) + text + buffer


def is_safetensors(data: bytes) -> bool:
    try:
        header, _ = split_safetensors(data)
    except (struct.error, ValueError):
        return False
    return isinstance(header, dict)


# ------------------------------------------------------------------------------------------------ TOML
def toml_value(v: Any) -> str:
    """A TOML literal for a JSON-like value (None, which TOML lacks, becomes an empty inline table)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v > 0 else "-inf") if abs(v) == float("inf") else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    return "{}"


def toml_document(doc: dict) -> str:
    """Top-level keys with non-table values first, then each list of tables as [[name]] blocks."""
    lines, blocks = [], []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(t, dict) for t in v):
            for t in v:
                blocks.append(f"[[{toml_value(str(k))}]]")
                blocks += [f"{toml_value(str(f))} = {toml_value(x)}" for f, x in t.items()]
        else:
            lines.append(f"{toml_value(str(k))} = {toml_value(v)}")
    return "\n".join(lines + blocks) + "\n"


TENANCY_DOC = {"tenants": [
    {"name": "acme", "api_key": "sk-acme-0123456789", "adapters": ["acme-*", "shared"]},
    {"name": "ops", "api_key_env": "DELTAFLEET_FUZZ_KEY", "adapters": ["*"], "admin": True},
]}


@st.composite
def hostile_toml(draw, text: str) -> bytes:
    """A mutated tenancy document written as TOML, mutated TOML bytes, or TOML that breaks naive parsers."""
    kind = draw(st.integers(0, 9))
    if kind == 9:
        return draw(st.sampled_from(["a = " + "[" * 50_000 + "]" * 50_000, "a = " + "9" * 5000,
                                     "a = 0x" + "f" * 5000, "[[tenants]]\nname = 1979-02-30", ""])).encode()
    if kind >= 6:
        return draw(mutated_bytes(text.encode()))
    doc = draw(mutated_json(TENANCY_DOC))
    return toml_document(doc if isinstance(doc, dict) else {"tenants": doc}).encode()
