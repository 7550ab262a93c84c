"""Prepacked fp32 and bf16 linear weights for CPU serving: oneDNN matmuls over weights reordered once, at start-up.

`F.linear` on fp32 CPU tensors calls MKL's sgemm, which packs the weight panel again on every call; for the
engine's token batches (a few to a few thousand rows) over weights that live in DRAM, that packing is a large
share of the step. oneDNN with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the op torch.compile's CPU weight prepacking uses) skips it. On
SmolLM2-135M's shapes (2-core AVX2 EPYC, 32 rows, the 210 projections and the 49152-row LM head of one decode
step, weights in DRAM; `python bench/kernels.py --dram`) the matmuls of a step went from 118 to 94 ms.

It is a module swap chosen once at start-up, like a quantized base's `QuantLinear` (gpt-fast style): the model
file only calls its projections, and `pack_linears_(model)` replaces every fp32 or bf16 CPU `nn.Linear` (exactly that
type: a `QuantLinear` is left alone) with a `PrepackedLinear`; `unpack_linears_(model)` swaps plain `nn.Linear`s
back. Semantics, in plain PyTorch (the reference the tests compare with):

    PrepackedLinear(lin)(x) == F.linear(x, lin.weight, lin.bias)

A `PrepackedLinear` holds the *same* `weight` and `bias` Parameters as the `nn.Linear` it replaces, and they stay
the source of truth: state_dict keys do not change, a tied LM head still shares the embedding table, and merges
and conversions write to `module.weight` as before. The packed copy sits beside them (a plain attribute, never
saved) and costs one more copy of those weights in memory. It is used only for a CPU input of the weight's dtype
that needs no gradient; anything else (autograd, other dtypes or devices) takes `F.linear` over `weight`.

bf16: `F.linear` on bf16 CPU tensors also goes to oneDNN, which reorders the weight on every call; over the
prepacked copy a decode step's matmuls (SmolLM2-135M, 210 projections + LM head, weights in DRAM, AMD EPYC with
avx512_bf16) took 21 ms instead of 31 at 1 row and 38 instead of 52 at 32 rows, bit-identical. bf16 is packed only
where oneDNN computes bf16 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: avx512_bf16 / AMX, or AVX-512).

Freshness: the packed copy remembers the data pointer and version counter of the weight it was made from. A
weight changed in place (`merge_adapter`, `mul_`) or replaced (`.data = ...`, a new Parameter, `.to(dtype)`)
after packing is noticed on the next call, which drops the stale copy and *repacks* when the weight is still a
packable CPU tensor and the call takes the packed path (one reorder, then full speed again: a merged tenant keeps the
oneDNN path); otherwise the call takes `F.linear` and the memory of the stale copy is freed.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet import native
from deltafleet.models.llama import RMSNorm, unit_rms

PRIMITIVE_CACHE_VARS = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")  # ideep's, then oneDNN's


def bound_primitive_caches(capacity: int) -> None:
    """Cap both caches that keep one oneDNN primitive per matmul shape (default 1024 each, about 0.4 MB a
    primitive for SmolLM2's shapes: `deltafleet bench memory`). They read these variables when the process first
    uses them, so call this before the first oneDNN matmul; later calls have no effect."""
    if capacity < 1:
        raise ValueError(f"capacity={capacity}: must be >= 1")
    for var in PRIMITIVE_CACHE_VARS:
        os.environ[var] = str(capacity)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Calls of at most this many rows go to the native streaming kernel (`deltafleet.native.gemv_`: each weight row read
# once, all rows' dot products from it) instead of oneDNN; measured on SmolLM2's decode-step shapes (weights in
# DRAM, `python bench/kernels.py --gemv`).
GEMV_ROWS = {torch.bfloat16: 8, torch.float32: 2}


def _packable(w: Tensor) -> bool:
    """fp32 CPU weights, and bf16 ones where oneDNN computes bf16 (with avx512_bf16 / AMX, or emulated on AVX-512)."""
    if w.device.type != "cpu":
        return False
    return w.dtype is torch.float32 or (w.dtype is torch.bfloat16 and _bf16_supported())


@functools.cache
def _bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PrepackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` through a oneDNN-reordered copy of `weight`. x (..., in) -> y (..., out).

    `batch_hint`: the typical number of rows per call (oneDNN picks its blocking for it; any row count works).
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.batch_hint = batch_hint
        self.weight = linear.weight  # the same Parameters, not copies
        self.register_parameter("bias", linear.bias)
        self._packed: Tensor | None = None  # oneDNN layout; a plain attribute: not saved, not cast by .to()
        self._source: tuple[int, int] | None = None  # (data_ptr, _version) of the weight it was made from
        self._repack()

    def _repack(self) -> None:
        w = self.weight
        self._packed = self._source = None
        if _packable(w):
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.batch_hint)
            self._source = (w.data_ptr(), w._version)

    def packed(self) -> Tensor | None:
        """The packed weight, repacked first if `weight` changed or was replaced since; None if it is not packable
        (fp32 or bf16 on the CPU)."""
        w = self.weight
        if self._source is None or self._source != (w.data_ptr(), w._version):
            self._repack()
        return self._packed

    @property
    def packed_nbytes(self) -> int:
        return 0 if self._packed is None else self._packed.numel() * self._packed.element_size()

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if (x.dtype is w.dtype and x.is_cpu and _packable(w)
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                      or (b is not None and b.requires_grad)))):
            rows = x.numel() // self.in_features
            if rows <= GEMV_ROWS.get(x.dtype, 0) and x.is_contiguous():
                out = x.new_empty(*x.shape[:-1], self.out_features)
                if native.gemv_(x.view(rows, self.in_features), w, b, out.view(rows, self.out_features)):
                    return out
            return torch.ops.mkldnn._linear_pointwise(x, self.packed(), b, "none", [], "")
        if self._packed is not None and not _packable(w):
            self._packed = self._source = None  # converted to an unpackable dtype or device: free the stale copy
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"batch_hint={self.batch_hint}, packed={self._packed is not None}")


class NativeRMSNorm(nn.Module):
    """`llama.RMSNorm` in one native call per norm (`deltafleet.native.rms_norm_`) for a CPU input of the weight's
    dtype (fp32 or bf16) that needs no gradient; anything else takes `RMSNorm.forward`. Holds the same `weight`
    Parameter (state_dict keys unchanged). A bf16 decode step has 61 norms of six to eight ATen ops each."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.dtype is w.dtype and x.is_cpu and x.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            d = w.shape[0]
            out = x.new_empty(x.shape)
            if native.rms_norm_(x.view(-1, d), w, self.eps, out.view(-1, d)):
                return out
        return RMSNorm.forward(self, x)

    def unit(self, x: Tensor) -> Tensor:
        """`RMSNorm.unit` (what a norm hook receives); bf16 needing no gradient: one native call, the native RMSNorm
        with a weight of ones (the normalised x rounded once, then times 1 exactly: bit-identical), instead of three
        ATen ops (fp32 is one op already)."""
        if (x.dtype is torch.bfloat16 and x.is_cpu and x.is_contiguous()
                and not (torch.is_grad_enabled() and x.requires_grad)):
            d = x.shape[-1]
            out = x.new_empty(x.shape)
            if native.rms_norm_(x.view(-1, d), _ones(d, x.dtype), self.eps, out.view(-1, d)):
                return out
        return unit_rms(x, self.eps)


@functools.cache
def _ones(d: int, dtype: torch.dtype) -> Tensor:
    return torch.ones(d, dtype=dtype)


def pack_norms_(model: nn.Module) -> int:
    """Swap every `llama.RMSNorm` inside `model` for a `NativeRMSNorm` over the same weight (idempotent); returns
    how many. A no-op where the native kernels are unavailable."""
    if native.rms_norm(torch.float32) is None:
        return 0
    return _swap_children_(model, lambda m: NativeRMSNorm(m) if type(m) is RMSNorm else None)


def unpack_norms_(model: nn.Module) -> None:
    """Swap every `NativeRMSNorm` back to a `llama.RMSNorm` over the same weight."""
    def plain(m: nn.Module) -> RMSNorm | None:
        if not isinstance(m, NativeRMSNorm):
            return None
        norm = RMSNorm(m.weight.shape[0], m.eps)
        norm.weight = m.weight
        return norm

    _swap_children_(model, plain)


def _swap_children_(model: nn.Module, make) -> int:
    """Replace each child module `c` (at any depth) for which `make(c)` is not None by that; returns the count.
    A module reached through several parents is replaced by one new module everywhere."""
    memo: dict[nn.Module, nn.Module | None] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if child not in memo:
                memo[child] = make(child)
            if memo[child] is not None:
                setattr(parent, name, memo[child])
    return sum(m is not None for m in memo.values())


def pack_linears_(model: nn.Module, batch_hint: int = 32) -> int:
    """Swap every fp32 CPU `nn.Linear` inside `model` for a `PrepackedLinear` sharing its Parameters (modules
    already swapped are kept: idempotent); returns the bytes added. A no-op where oneDNN is unavailable."""
    if type(model) is nn.Linear:
        raise ValueError("pack_linears_ swaps the submodules of a model; got a bare nn.Linear: wrap it as "
                         "PrepackedLinear(linear) instead")
    if not available():
        return 0
    before = packed_bytes(model)
    _swap_children_(model, lambda m: PrepackedLinear(m, batch_hint)
                    if type(m) is nn.Linear and _packable(m.weight) else None)
    return packed_bytes(model) - before


def unpack_linears_(model: nn.Module) -> None:
    """Swap every `PrepackedLinear` back to a plain `nn.Linear` over the same Parameters (packed copies are freed)."""
    def plain(m: nn.Module) -> nn.Linear | None:
        if not isinstance(m, PrepackedLinear):
            return None
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        return lin

    _swap_children_(model, plain)


def packed_bytes(model: nn.Module) -> int:
    """Memory held by packed copies in `model` (each module once, however often it is reached)."""
    return sum(m.packed_nbytes for m in model.modules() if isinstance(m, PrepackedLinear))
