"""The quantized-base directory: write it, recognise it, read it, load it into our model or into transformers.

Layout (built offline, gpt-fast style; the projections are swapped for `QuantLinear`s, or OneBit's
`SignLinear`s, at load):

    config.json            copied from the source checkpoint (unchanged: a plain Llama-family config)
    tokenizer files        copied from the source checkpoint
    quantized.safetensors  per projection `model.layers.{i}.{self_attn|mlp}.{proj}.qcodes` (uint8, the densely
                           packed b-bit codes, ceil(R*C*b/8) bytes), `.qscale` (fp16 (R, ngroups)), `.qzero`
                           (uint8 (R, ngroups)); with `quantized_tables` in the manifest (`--embedding rtn`) the
                           same three tensors under `model.embed_tokens` (and `lm_head` when untied): the table
                           RTN-quantized at the base's bits and group size; every other tensor (norms, biases, and
                           the tables otherwise) dense in `dense_dtype`
                           OneBit (manifest `codec` "sign"): per projection `.qsigns` (uint8 (R, ceil(C/8)), the
                           row-aligned packed signs of `store.signs`), `.qin` (fp16 (C,), g) and `.qout` (fp16 (R,), h)
    deltafleet.json        manifest: schema_version, format "deltafleet-quantized-base", method, bits, group_size
                           (not for codec "sign"), dense_dtype, method settings, source base and fingerprint, byte
                           counts, lora_init, quantized_tables (optional: absent means none), codec (optional:
                           absent means "affine")
    lora_init/             (apiq, loftq) a peft LoRA adapter directory: the initialisation to fine-tune from

A directory is recognised as a quantized base by its manifest's `format` field, never by its name. Anything
malformed (wrong schema, a field of the wrong type, bits out of range, missing or mis-shaped tensor, truncated file)
raises `ArtifactError` naming the file; `read_quantized_base` raises nothing else (`tests/fuzz`). Dequantization
is `store.quantized.dequantize`; transformers gets the dequantized (fake-quantized) weights, which is numerically
what a dequantize-then-matmul QLoRA layer computes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltafleet.dtypes import DTYPES
from deltafleet.errors import ArtifactError
from deltafleet.models.config import PROJECTIONS, ModelConfig
from deltafleet.models.llama import Transformer, rope_inv_freq
from deltafleet.models.loading import expected_shapes
from deltafleet.quant.config import QUANT_BITS
from deltafleet.quant.linear import DEFAULT_KERNEL, QuantEmbedding, QuantLinear
from deltafleet.quant.registry import ModuleKey
from deltafleet.quant.sign_linear import LayerNormedLinear, SignLinear
from deltafleet.registry import Registry
from deltafleet.store.manifest import MANIFEST, read_manifest, write_manifest
from deltafleet.store.quantized import QuantizedMatrix
from deltafleet.store.safetensors_io import load_tensors, save_tensors, short
from deltafleet.store.signs import SignMatrix

FORMAT = "deltafleet-quantized-base"
WEIGHTS = "quantized.safetensors"
LORA_INIT = "lora_init"
TABLES = ("model.embed_tokens", "lm_head")  # the tables `--embedding rtn` may quantize, by checkpoint prefix
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".lock")
_NOT_COPIED = ("model.safetensors.index.json", MANIFEST, ".deltafleet-fingerprint.json", "deltafleet_source.json")


Matrix = QuantizedMatrix | SignMatrix
PACKED_LINEARS = (QuantLinear, SignLinear)  # the module types a quantized base's projections load as


@dataclass(frozen=True)
class Codec:
    """One stored matrix form of the projections (manifest field `codec`; absent means `affine`): its tensor
    suffixes, how to read one matrix (tensors, prefix, shape, bits, group size; raises ValueError naming the
    tensor) and the module that computes with it (matrix, bias, kernel, the base's manifest)."""

    suffixes: tuple[str, ...]
    bits: tuple[int, ...]
    read: Callable[[dict[str, Tensor], str, tuple[int, int], int, int | None], Matrix]
    linear: Callable[[Matrix, Tensor | None, str, dict[str, Any]], torch.nn.Module]
    grouped: bool = True  # the manifest must give a positive group_size
    layernorm: Callable[[dict[str, Any]], bool] = lambda m: False


CODECS: Registry[Codec] = Registry("quantized-base codec")
CODECS.register("affine", Codec(("qcodes", "qscale", "qzero"), QUANT_BITS, QuantizedMatrix.from_tensors,
                                lambda qm, bias, kernel, m: QuantLinear(qm, bias, kernel)))


def _onebit_layernorm(m: dict[str, Any]) -> bool:
    return (m.get("settings") or {}).get("onebit_layernorm") is True


CODECS.register("sign", Codec(("qsigns", "qin", "qout"), (1,),
                              lambda t, prefix, shape, bits, gs: SignMatrix.from_tensors(t, prefix, shape),
                              lambda sm, bias, kernel, m: SignLinear(sm, bias, kernel, _onebit_layernorm(m)),
                              grouped=False, layernorm=_onebit_layernorm))


def _group(proj: str) -> str:
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def module_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{_group(proj)}.{proj}"


@dataclass
class QuantizedBase:
    """A quantized base in memory."""

    config: ModelConfig
    matrices: dict[ModuleKey, Matrix]
    dense: dict[str, Tensor]  # every other tensor, by its checkpoint name
    manifest: dict[str, Any]
    tables: dict[str, QuantizedMatrix] = field(default_factory=dict)  # quantized tables by prefix (TABLES)

    @property
    def codec(self) -> Codec:
        return CODECS[self.manifest.get("codec", "affine")]

    def dequantized_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """The checkpoint a plain model would load: dense tensors plus W_hat for every quantized weight."""
        state = {k: v.to(dtype) for k, v in self.dense.items()}
        for (layer, proj), qm in self.matrices.items():
            state[f"{module_name(layer, proj)}.weight"] = qm.dequantize().to(dtype)
        for prefix, qm in self.tables.items():
            state[f"{prefix}.weight"] = qm.dequantize().to(dtype)
        return state


# ----------------------------------------------------------------------------------------------- bytes
def weight_bytes(matrices: dict[ModuleKey, Matrix], dense: dict[str, Tensor],
                 tables: dict[str, QuantizedMatrix] | None = None) -> dict[str, int]:
    """Bytes of the projection weights quantized vs in bf16, of quantized tables, and of the whole model (dense
    tensors as stored)."""
    tables = tables or {}
    proj_q = sum(qm.nbytes for qm in matrices.values())
    proj_bf16 = sum(2 * qm.shape[0] * qm.shape[1] for qm in matrices.values())
    tab_q = sum(qm.nbytes for qm in tables.values())
    tab_bf16 = sum(2 * qm.shape[0] * qm.shape[1] for qm in tables.values())
    dense_b = sum(t.numel() * t.element_size() for t in dense.values())
    dense_bf16 = sum(2 * t.numel() for t in dense.values())
    return {"projections": proj_q, "projections_bf16": proj_bf16, "tables": tab_q, "dense": dense_b,
            "total": proj_q + tab_q + dense_b, "total_bf16": proj_bf16 + tab_bf16 + dense_bf16}


# ----------------------------------------------------------------------------------------------- write
def write_quantized_base(out: Path, source: Path, matrices: dict[ModuleKey, Matrix],
                         dense: dict[str, Tensor], manifest: dict[str, Any],
                         tables: dict[str, QuantizedMatrix] | None = None) -> dict[str, Any]:
    """Write config, tokenizer, tensors and manifest into `out` (created; must not hold a quantized base)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / WEIGHTS).exists() or (out / MANIFEST).exists():
        raise ArtifactError(out, f"already holds {WEIGHTS} or {MANIFEST}; choose another --out")
    for f in sorted(source.iterdir()):
        if f.is_file() and f.suffix not in _NOT_COPIED_SUFFIXES and f.name not in _NOT_COPIED:
            shutil.copy2(f, out / f.name)
    tensors = dict(dense)
    for (layer, proj), qm in matrices.items():
        tensors.update(qm.tensors(module_name(layer, proj)))
    for prefix, qm in (tables or {}).items():
        tensors.update(qm.tensors(prefix))
    save_tensors(tensors, out / WEIGHTS, metadata={"format": FORMAT})
    fields = {**manifest, "bytes": weight_bytes(matrices, dense, tables)}
    if tables:
        fields["quantized_tables"] = sorted(tables)
    write_manifest(out, FORMAT, fields)
    return read_manifest(out, FORMAT)


def write_lora_init(out: Path, lora: dict[ModuleKey, tuple[Tensor, Tensor]], rank: int, alpha: float,
                    targets: tuple[str, ...], base_fingerprint: str, method: str) -> Path:
    """A peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors) plus our manifest."""
    from peft import LoraConfig

    d = out / LORA_INIT
    d.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM").save_pretrained(str(d))
    tensors = {}
    for (layer, proj), (A, B) in lora.items():
        prefix = f"base_model.model.{module_name(layer, proj)}"
        tensors[f"{prefix}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.float().contiguous()
    save_tensors(tensors, d / "adapter_model.safetensors")
    write_manifest(d, "peft", {"kind": "lora", "base_fingerprint": base_fingerprint, "method": f"{method}-init",
                               "hyperparameters": {"lora_rank": rank, "lora_alpha": alpha, "targets": list(targets)}})
    return d


# ----------------------------------------------------------------------------------------------- read
def is_quantized_base(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and read_manifest(p, FORMAT) is not None


def _check_manifest(m: dict[str, Any], mpath: Path) -> tuple[Codec, int, int | None, torch.dtype]:
    name = m.get("codec", "affine")
    if not isinstance(name, str) or name not in CODECS:
        raise ArtifactError(mpath, f"codec={short(name)}: must be one of {sorted(CODECS)}")
    codec = CODECS[name]
    bits, gs, dd = m.get("bits"), m.get("group_size"), m.get("dense_dtype")
    if not isinstance(bits, int) or bits not in codec.bits:
        raise ArtifactError(mpath, f"bits={short(bits)}: must be one of {codec.bits} for codec {name!r}")
    if codec.grouped and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
        raise ArtifactError(mpath, f"group_size={short(gs)}: must be a positive integer")
    if not isinstance(dd, str) or dd not in DTYPES:
        raise ArtifactError(mpath, f"dense_dtype={short(dd)}: must be one of {sorted(DTYPES)}")
    return codec, bits, gs, DTYPES[dd]


def read_quantized_base(path: str | Path) -> QuantizedBase:

    d = Path(path)
    mpath = d / MANIFEST
    m = read_manifest(d, FORMAT)
    if m is None:
        raise ArtifactError(d, f"not a quantized base: {MANIFEST} with format {FORMAT!r} not found")
    codec, bits, gs, _ = _check_manifest(m, mpath)
    cfg = ModelConfig.from_file(d / "config.json")
    wpath = d / WEIGHTS
    if not wpath.is_file():
        raise ArtifactError(wpath, "quantized weights file not found")
    tensors = load_tensors(wpath)
    matrices: dict[ModuleKey, QuantizedMatrix] = {}
    for layer in range(cfg.num_layers):
        for proj in PROJECTIONS:
            prefix = module_name(layer, proj)
            try:
                matrices[(layer, proj)] = codec.read(tensors, prefix, cfg.linear_shape(proj), bits, gs)
            except ValueError as e:
                raise ArtifactError(wpath, f"{e} (with bits={bits}, group_size={gs} from {MANIFEST})") from None
            for suffix in codec.suffixes:
                tensors.pop(f"{prefix}.{suffix}")
    want = {k: v for k, v in expected_shapes(cfg).items()
            if not (k.endswith(".weight") and k.rsplit(".", 2)[-2] in PROJECTIONS)}
    if cfg.tie_word_embeddings:
        want.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)
    names = m.get("quantized_tables", [])
    if names and codec is not CODECS["affine"]:
        raise ArtifactError(mpath, f"quantized_tables={short(names)}: only an affine-codec base quantizes tables")
    if (not isinstance(names, list) or len(set(map(str, names))) != len(names)
            or any(n not in TABLES or f"{n}.weight" not in want for n in names)):
        raise ArtifactError(mpath, f"quantized_tables={short(names)}: must list distinct tables of this model among "
                                   f"{TABLES}")
    tables: dict[str, QuantizedMatrix] = {}
    for prefix in names:
        try:
            tables[prefix] = QuantizedMatrix.from_tensors(tensors, prefix, want.pop(f"{prefix}.weight"), bits, gs)
        except ValueError as e:
            raise ArtifactError(wpath, f"{e} (with bits={bits}, group_size={gs} from {MANIFEST})") from None
        for suffix in ("qcodes", "qscale", "qzero"):
            tensors.pop(f"{prefix}.{suffix}")
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise ArtifactError(wpath, f"tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = sorted(set(tensors) - set(want))
    if unexpected:
        raise ArtifactError(wpath, f"unexpected tensor {unexpected[0]!r}: not part of a {cfg.model_type} model")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise ArtifactError(wpath, f"tensor {k!r} has shape {tuple(tensors[k].shape)}, config implies {shape}")
    return QuantizedBase(cfg, matrices, tensors, m, tables)


# ----------------------------------------------------------------------------------------------- load
def load_quantized_model(path: str | Path, dtype: torch.dtype = torch.float32, kernel: str = DEFAULT_KERNEL):
    """Our `Transformer` with a `QuantLinear` (kernel `kernel`) for every projection; eval mode."""
    qb = read_quantized_base(path)
    cfg = qb.config
    dense = dict(qb.dense)
    with torch.device("meta"):
        model = Transformer(cfg)
    for (layer, proj), qm in qb.matrices.items():
        bias = dense.pop(f"{module_name(layer, proj)}.bias", None)
        block = model.model.layers[layer]
        parent = block.self_attn if _group(proj) == "self_attn" else block.mlp
        setattr(parent, proj, qb.codec.linear(qm, None if bias is None else bias.to(dtype), kernel, qb.manifest))
    if "model.embed_tokens" in qb.tables:
        model.model.embed_tokens = QuantEmbedding(qb.tables["model.embed_tokens"], dtype, kernel)
        if cfg.tie_word_embeddings:
            model.lm_head = model.model.embed_tokens.table  # the same buffers: one copy of the table
    if "lm_head" in qb.tables:
        model.lm_head = QuantLinear(qb.tables["lm_head"], None, kernel)
    model.load_state_dict({k: v.to(dtype) for k, v in dense.items()}, strict=False, assign=True)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
    return model.eval()


def load_base(path: Path, dtype: torch.dtype) -> Transformer:
    """The loader `models.loading.load_model` calls for this format (registered by `deltafleet.quant`): the
    dequantizing kernel is `native` (a C dequantizer, falling back to `fast`) unless the environment variable
    DELTAFLEET_QUANT_KERNEL names another (`reference`, `fast`, `cached`)."""
    return load_quantized_model(path, dtype, os.environ.get("DELTAFLEET_QUANT_KERNEL", DEFAULT_KERNEL))


def set_kernel(model, kernel: str) -> int:
    """Switch every `QuantLinear` and `SignLinear` of `model` to `kernel`; returns how many were switched."""
    layers = [m for m in model.modules() if isinstance(m, PACKED_LINEARS)]
    for m in layers:
        m.set_kernel(kernel)
    return len(layers)


def hf_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM whose projection weights are the quantized base's dequantized weights (a OneBit
    base with its LayerNorm: each projection a `LayerNormedLinear`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qb = read_quantized_base(path)
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if qb.codec.layernorm(qb.manifest):
        for layer, proj in qb.matrices:
            parent = model.get_submodule(module_name(layer, proj).rsplit(".", 1)[0])
            old = getattr(parent, proj)
            new = LayerNormedLinear(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype)
            setattr(parent, proj, new)
    result = model.load_state_dict(qb.dequantized_state_dict(dtype), strict=False)
    allowed = {"lm_head.weight"} if qb.config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in allowed and not k.endswith("rotary_emb.inv_freq")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ArtifactError(Path(path) / WEIGHTS, f"tensor {bad!r} does not fit transformers' {config.model_type}")
    model.tie_weights()
    return model.eval()
