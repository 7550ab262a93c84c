"""Prepacked fp32 linear weights for CPU serving: oneDNN matmuls over weights reordered once, at start-up.

`F.linear` on fp32 CPU tensors calls MKL's sgemm, which packs the weight panel again on every call; for the
engine's token batches (a few to a few thousand rows) over weights that live in DRAM, that packing is a large
share of the step. oneDNN with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the op torch.compile's CPU weight prepacking uses) skips it. On
SmolLM2-135M's shapes (2-core AVX2 EPYC, 32 rows, the 210 projections and the 49152-row LM head of one decode
step, weights in DRAM; `python bench/kernels.py --dram`) the matmuls of a step went from 118 to 94 ms.

The module's `weight` stays the source of truth (state_dicts, merges and conversions read it); the packed copy
sits beside it and costs one more copy of those weights in memory. A weight replaced or changed in place after
packing (its data pointer or version counter moved) is detected on the next call, which then takes `F.linear`.
Only fp32 `nn.Linear`s on the CPU are packed; `linear(module, x)` is `module(x)` for anything else.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_ATTR = "_df_prepacked"  # (packed weight, source data_ptr, source version)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears_(model: nn.Module, batch_hint: int = 32) -> int:
    """Attach a packed copy to every fp32 CPU `nn.Linear` of `model` (idempotent); returns the bytes added.
    `batch_hint`: the typical number of rows per call (oneDNN picks its blocking for it; any row count works)."""
    if not available():
        return 0
    added = 0
    with torch.no_grad():
        for module in model.modules():
            w = module.weight if type(module) is nn.Linear else None
            if w is None or w.dtype != torch.float32 or w.device.type != "cpu" or _packed(module) is not None:
                continue
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
            object.__setattr__(module, _ATTR, (packed, w.data_ptr(), w._version))
            added += w.numel() * w.element_size()
    return added


def unpack_linears_(model: nn.Module) -> None:
    """Drop the packed copies (their memory is freed; the modules compute with `F.linear` again)."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)


def _packed(module: nn.Module) -> Tensor | None:
    """The module's packed weight if it still matches `module.weight`; a stale one (the weight changed or was
    replaced after packing) is dropped."""
    entry = module.__dict__.get(_ATTR)
    if entry is None:
        return None
    w = module.weight
    if entry[1] == w.data_ptr() and entry[2] == w._version:
        return entry[0]
    del module.__dict__[_ATTR]
    return None


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """module(x), through the packed weight when there is a fresh one and x is an fp32 CPU tensor that needs no
    gradient."""
    packed = _packed(module)
    if (packed is not None and x.dtype is torch.float32 and x.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
    return module(x)


def packed_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if _ATTR in m.__dict__)
