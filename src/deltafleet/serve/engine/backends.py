"""Backends that apply a pool's adapters to one projection of a mixed batch; chosen once at start-up.

Semantics (the reference backend spells them out token by token; fast backends must match it):
    additive:     y[i] += (x[i] @ A[k_i, :r].T) @ B[k_i, :r]     k_i = pool row of token i, r = step width
    elementwise:  y[i]  = y[i] * c[k_i] + rotate_half_G(y[i]) * s[k_i]
    sparse:       y[i] += x[i] @ dW(values[k_i])^T                dW in CSR over the pool's shared (cols, row_ptr)
    norm:         y[i] += x[i] * delta[k_i]                        x: the RMSNorm's normalised input (HiWi)
    embedding:    y[i] += B[k_i, :, t_i] @ A[k_i]                  a table (V, H) as A (R, H), B (R, V); t_i token id
    qadditive:    as additive, A[k_i] and B[k_i] the slot's rows dequantized (`adapters.qadditive.dense_rows`)
Null rows (A = B = 0, c = 1, s = 0) make non-member tokens pass through unchanged.

- `reference`: a plain loop over tokens; the oracle in tests.
- `cpu`: batched. Additive is the native BGMV kernel (`deltafleet.native`, fp32 activations, fp32 or bf16
  pools: each token reads its adapter's rows in place, one call per projection) for every step shape: on
  SmolLM2's shapes it beat grouped_mm 2.5-7x from 32 to 2048 tokens and 1 to 32 adapters (`bench/kernels.py`).
  Native kernels are bound to a pool's tensors once (`deltafleet.native.BoundBgmv`/`BoundRoad`) and take the
  projection's (..., features) tensors as they come, so a call costs a few microseconds of Python.
  Without the native kernel (no compiler, or a non-fp32 model), additive is two grouped matmuls
  (`torch._grouped_mm`, Punica's SGMV) over the member tokens sorted by slot once per step, each slot's A and B
  read in place from the pool; without grouped_mm, it picks by the step's shape: one matmul pair per segment
  when few adapters cover many tokens (prefill), else a gather + batched matmul per token.
  Elementwise is the native RoAd kernel (one in-place pass per projection), else one gather and element-wise ops.
  Sparse is the native sparse-additive kernel (each token reads its slot's values over the shared mask), else one
  gather of inputs and values and one index_add (`adapters.pafi.functional.sparse_apply_batched`). Norm is the native
  per-token gain kernel (`native/norm_cpu.c`'s `norm_gain`: one pass, 61 norms a step), else one gather and one
  fused multiply-add. Qadditive is the
  native quantized BGMV (`native/qlora_cpu.c`: rows dequantized as read, the stored bytes streamed), and its
  tables' embedding lookup a native kernel too; else each distinct slot's rows are dequantized and applied as a
  matmul pair.

A backend applies each pool family with its own method, named per family in `Backend.appliers`; the batch layout
looks the method up once per step and pool (`applier`), so a projection call dispatches on nothing.

Fused projections (`Backend.fuse`): the `cpu` backend applies all of a projection's pools in one C call
(`native.Chain` over the pools' bound kernels, whose steps it reads from per-pool records that `prepare` points at
each forward's batch), instead of one Python call per pool. The chains sit in a table per set of active pools
(`fused_table`, keyed by the pools, their versions and module sets), so a later step's call is a dict lookup and
one C call. Measured on SmolLM2-135M, bf16, batch 32 of 11 LoRA, 11 RoAd and 10 `ft` tenants (2-core AMD EPYC,
session 11): a projection's hook 98 -> 77 us, of which the kernels 72. Gain norms likewise (`fuse_norm`: the
model's native RMSNorm and one pool's gains in one pass). Pools without a chainable kernel (sparse), a
non-contiguous x, or a batch the records do not hold fall back to the per-pool appliers, which stay the reference
for the fused path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.pafi.functional import sparse_apply, sparse_apply_batched
from deltafleet.adapters.qadditive import QADDITIVE, dense_rows
from deltafleet.adapters.road.functional import rotate_half_grouped
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, GAIN, NORM, SPARSE
from deltafleet.models.prepack import NativeRMSNorm
from deltafleet.native import BoundBgmv, BoundQBgmv, BoundRoad, BoundSparse, Chain, PoolRecord
from deltafleet.native import norm_gain_ as native_norm_gain
from deltafleet.native import rms_norm_gain_ as native_rms_norm_gain
from deltafleet.registry import Registry
from deltafleet.serve.engine.pools import PoolStep

# (x (..., in), y (..., out), the pool's tensors for the projection, step) -> adapted y (..., out)
Applier = Callable[[Tensor, Tensor, dict[str, Tensor], PoolStep], Tensor]
# (x, y) -> whether it adapted y in place for every member pool (False: it did nothing; apply each pool instead)
Fused = Callable[[Tensor, Tensor], bool]
# (norm module, x (..., H)) -> the adapted norm output, or None (it did nothing: take the norm and its applier instead)
FusedNorm = Callable[[object, Tensor], Tensor | None]


class Backend(ABC):
    name: str
    # pool family -> the method that applies one pool of that family to one projection (an `Applier`)
    appliers: ClassVar[dict[str, str]] = {ADDITIVE: "apply_additive", ELEMENTWISE: "apply_elementwise",
                                          SPARSE: "apply_sparse", NORM: "apply_norm", QADDITIVE: "apply_qadditive"}
    # pool family -> the method that applies a whole fine-tune's table at the embedding lookup
    embedders: ClassVar[dict[str, str]] = {ADDITIVE: "embed_additive", QADDITIVE: "embed_qadditive"}

    def applier(self, family: str) -> Applier:
        """The method applying pools of `family`: x (..., in), y (..., out) with N = prod(...) tokens -> adapted
        y (..., out), for one pool and one projection."""
        name = self.appliers.get(family)
        if name is None:
            raise ValueError(f"pool family {family!r}: backend {self.name!r} applies {sorted(self.appliers)}")
        return getattr(self, name)

    def fused_table(self, steps: list[PoolStep]) -> dict | None:
        """A forward's table of fused calls, projection key -> `Fused` or None (filled by the caller with `fuse`,
        at a projection's first call), kept across forwards over the same pools (and pool versions) and module sets;
        None when this backend never fuses. The caller then `prepare`s the steps."""
        return None

    def fuse_norm(self, members: list[tuple[PoolStep, dict[str, Tensor]]], norm, x: Tensor) -> FusedNorm | None:
        """One call computing RMSNorm `norm` of x and every member pool's gain delta for it (each member: its step and
        its tensors for this norm), or None: then the norm and the norm applier run. This one never fuses."""
        return None

    def prepare(self, steps: list[PoolStep]) -> None:
        """Called once per forward with the batch's pool steps, before any fused call of that forward (this one keeps
        nothing)."""
        return None

    def fuse(self, members: list[tuple[PoolStep, dict[str, Tensor]]], x: Tensor, y: Tensor) -> Fused | None:
        """One call applying every member pool (its step and its tensors for this projection) to a projection shaped
        like x (..., in), y (..., out), or None: then each pool's applier runs. This one never fuses."""
        return None

    def apply_additive(self, x: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        shape = y.shape
        return self.additive(x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1]), tensors["A"], tensors["B"],
                             step).reshape(shape)

    def apply_elementwise(self, x: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        shape = y.shape
        return self.elementwise(y.reshape(-1, shape[-1]), tensors["c"], tensors["s"], step).reshape(shape)

    def apply_sparse(self, x: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        shape = y.shape
        return self.sparse(x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1]), tensors["values"], tensors["cols"],
                           tensors["row_ptr"], step).reshape(shape)

    def sparse(self, x: Tensor, y: Tensor, values: Tensor, cols: Tensor, row_ptr: Tensor, step: PoolStep) -> Tensor:
        """x (N, in), y (N, out), values (slots + 1, nnz) -> adapted y (N, out)."""
        return y + sparse_apply_batched(x, values, cols, row_ptr, step.index)

    def apply_norm(self, x: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        """x: the normalised input (..., H), y the norm's output (..., H); per token y + x * delta[k]."""
        shape = y.shape
        x2, y2 = x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1])
        return torch.addcmul(y2, x2, tensors["delta"].index_select(0, step.index).to(y.dtype)).reshape(shape)

    def apply_embedding(self, ids: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        """ids (...) token ids, y (..., H) their embeddings -> y plus each member token's row of its slot's table."""
        name = self.embedders.get(step.pool.family)
        if name is None:
            raise ValueError(f"pool family {step.pool.family!r} holds no tables; backend {self.name!r} embeds "
                             f"{sorted(self.embedders)}")
        return getattr(self, name)(ids, y, tensors, step)

    def embed_additive(self, ids: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        """One matmul per distinct slot: (n_k, R) coefficients B[k, :, t] @ A[k] (R, H)."""
        return self._embed(ids, y, step, lambda slot: (tensors["A"][slot], tensors["B"][slot]))

    def embed_qadditive(self, ids: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        """As `embed_additive`, each distinct slot's rows dequantized (A (R, H), B (R, V))."""
        H, V = y.shape[-1], step.pool.cfg.vocab_size
        return self._embed(ids, y, step, lambda slot: _dense_slot(tensors, slot, H, V, step.pool.group))

    @staticmethod
    def _embed(ids: Tensor, y: Tensor, step: PoolStep, table) -> Tensor:
        shape = y.shape
        t, out = ids.reshape(-1), y.reshape(-1, shape[-1]).clone()
        for slot, tok in step.segments:
            A, B = table(slot)
            out.index_add_(0, tok, (B[:, t[tok]].t().to(y.dtype) @ A.to(y.dtype)))
        return out.reshape(shape)

    def apply_qadditive(self, x: Tensor, y: Tensor, tensors: dict[str, Tensor], step: PoolStep) -> Tensor:
        """Each distinct slot's rows dequantized, one matmul pair per slot over its tokens."""
        shape = y.shape
        x2, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1])
        for slot, tok in step.segments:
            A, B = _dense_slot(tensors, slot, x2.shape[-1], shape[-1], step.pool.group)
            out = out.index_add(0, tok, (x2[tok] @ A.t().to(x.dtype)) @ B.to(x.dtype))
        return out.reshape(shape)

    @abstractmethod
    def additive(self, x: Tensor, y: Tensor, A: Tensor, B: Tensor, step: PoolStep) -> Tensor: ...

    @abstractmethod
    def elementwise(self, y: Tensor, c: Tensor, s: Tensor, step: PoolStep) -> Tensor: ...


class ReferenceBackend(Backend):
    name = "reference"

    def additive(self, x, y, A, B, step):
        y = y.clone()
        r = step.width
        for i in range(x.shape[0]):
            k = int(step.index[i])
            y[i] += (x[i] @ A[k, :r].t().to(x.dtype)) @ B[k, :r].to(x.dtype)
        return y

    def elementwise(self, y, c, s, step):
        G = step.pool.width
        out = torch.empty_like(y)
        for i in range(y.shape[0]):
            k = int(step.index[i])
            out[i] = y[i] * c[k].to(y.dtype) + rotate_half_grouped(y[i], G) * s[k].to(y.dtype)
        return out


    def embed_additive(self, ids, y, tensors, step):
        return self._embed_tokens(ids, y, step, lambda k: (tensors["A"][k], tensors["B"][k]))

    def embed_qadditive(self, ids, y, tensors, step):
        H, V = y.shape[-1], step.pool.cfg.vocab_size
        return self._embed_tokens(ids, y, step, lambda k: _dense_slot(tensors, k, H, V, step.pool.group))

    @staticmethod
    def _embed_tokens(ids, y, step, table):
        shape = y.shape
        t, out = ids.reshape(-1), y.reshape(-1, shape[-1]).clone()
        for i in range(out.shape[0]):
            A, B = table(int(step.index[i]))
            out[i] = out[i] + B[:, int(t[i])].to(y.dtype) @ A.to(y.dtype)
        return out.reshape(shape)

    def apply_qadditive(self, x, y, tensors, step):
        shape = y.shape
        x2, out = x.reshape(-1, x.shape[-1]), y.reshape(-1, shape[-1]).clone()
        for i in range(out.shape[0]):
            A, B = _dense_slot(tensors, int(step.index[i]), x2.shape[-1], shape[-1], step.pool.group)
            out[i] += (x2[i] @ A.t().to(x.dtype)) @ B.to(x.dtype)
        return out.reshape(shape)

    def apply_norm(self, x, y, tensors, step):
        shape = y.shape
        x2, out = x.reshape(-1, shape[-1]), y.reshape(-1, shape[-1]).clone()
        for i in range(out.shape[0]):
            out[i] = out[i] + x2[i] * tensors["delta"][int(step.index[i])].to(y.dtype)
        return out.reshape(shape)

    def sparse(self, x, y, values, cols, row_ptr, step):
        y = y.clone()
        for i in range(x.shape[0]):
            y[i] += sparse_apply(x[i], values[int(step.index[i])], cols, row_ptr)
        return y


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, segment_ratio: int = 8, grouped: bool | None = None, native: bool = True):
        # Segments pay off when each distinct adapter covers at least `segment_ratio` tokens on average.
        self.segment_ratio = segment_ratio
        self.grouped = _grouped_mm_works() if grouped is None else grouped
        self.native = native
        # Native kernels bound to a pool's tensors (validated once, pointers cached), keyed by the id of the
        # pool's per-projection tensor dict, which lives as long as the pool: a decode step makes one call per
        # adapted projection, so per-call Python work is a visible share of the step.
        self._bound: dict[int, tuple[dict[str, Tensor], object]] = {}
        # pool id -> (pool, its record); (dtype, in, out, member tensor ids) -> (member tensors, chain or None)
        self._records: dict[int, tuple[object, PoolRecord]] = {}
        self._chains: dict[tuple, tuple[list[dict[str, Tensor]], Chain | None]] = {}
        # pool steps' signature -> their fused table (`fused_table`), at most 64, least recently used evicted first
        self._tables: dict[tuple, dict] = {}

    def _binding(self, tensors: dict[str, Tensor], bind):
        entry = self._bound.get(id(tensors))
        if entry is None or entry[0] is not tensors:
            entry = self._bound[id(tensors)] = (tensors, bind())
        return entry[1]

    # A pool module's bound kernel: (tensors, step, in, out) -> it, or None (it does not fit the kernel)
    def _bgmv(self, tensors: dict[str, Tensor], step: PoolStep, in_f: int, out_f: int) -> BoundBgmv | None:
        return self._binding(tensors, lambda: BoundBgmv.bind(tensors["A"], tensors["B"]))

    def _qbgmv(self, tensors: dict[str, Tensor], step: PoolStep, in_f: int, out_f: int) -> BoundQBgmv | None:
        return self._binding(tensors, lambda: BoundQBgmv.bind(tensors, in_f, out_f, step.pool.group))

    def _road(self, tensors: dict[str, Tensor], step: PoolStep, in_f: int, out_f: int) -> BoundRoad | None:
        return self._binding(tensors, lambda: BoundRoad.bind(tensors["c"], tensors["s"], step.pool.width))

    # pool family -> the method giving its bound kernel, which a `Chain` links
    _chainable: ClassVar[dict[str, str]] = {ADDITIVE: "_bgmv", QADDITIVE: "_qbgmv", ELEMENTWISE: "_road"}

    def fused_table(self, steps):
        if not self.native:
            return None
        signature = tuple((id(st.pool), st.pool.version, st.modules) for st in steps)
        table = self._tables.pop(signature, None)
        if table is None:
            table = {}
            if len(self._tables) >= 64:  # least recently used first
                self._tables.pop(next(iter(self._tables)))
        self._tables[signature] = table
        return table

    def prepare(self, steps):
        """Point each pool's record at its step (the chains built over it read index, null row and rank from it)."""
        if not self.native:
            return
        for st in steps:
            pool = st.pool
            entry = self._records.get(id(pool))
            if entry is None or entry[0] is not pool:
                entry = self._records[id(pool)] = (pool, PoolRecord(pool.width))
            entry[1].set(st.index, pool.null, st.width)

    def fuse(self, members, x, y):
        """The native kernels of every member pool in one `Chain` (one C call per projection), when each member's
        family has a bound kernel that fits. Chains are kept across steps, keyed by the members' tensors (a new
        tensor dict, after a pool regrows, builds a new chain); each reads its pools' steps from their records."""
        if not (self.native and members):
            return None
        key = (x.dtype, x.shape[-1], y.shape[-1], *(id(t) for _, t in members))
        hit = self._chains.get(key)
        if hit is None or any(a is not t for a, (_, t) in zip(hit[0], members, strict=True)):
            hit = self._chains[key] = ([t for _, t in members], self._chain(members, x, y))
        return hit[1]

    def fuse_norm(self, members, norm, x):
        """The native RMSNorm and one pool's gain delta in one pass (`native.rms_norm_gain_`, bf16): only over the
        model's own native norm (`NativeRMSNorm`), so every row, adapted or not, gets the bits that norm gives, and
        for one member pool (several: the unfused path). The pool's index comes from its record, per forward."""
        if not (self.native and len(members) == 1 and isinstance(norm, NativeRMSNorm) and x.dtype is torch.bfloat16):
            return None
        step, tensors = members[0]
        entry, delta = self._records.get(id(step.pool)), tensors.get(GAIN)
        if entry is None or entry[0] is not step.pool or delta is None or delta.dtype is not x.dtype:
            return None
        record, null = entry[1], step.pool.null

        def call(norm, x):
            index = record.index
            if index is None or not (isinstance(norm, NativeRMSNorm) and x.is_contiguous()):
                return None
            d = x.shape[-1]
            out = x.new_empty(x.shape)
            return out if native_rms_norm_gain(x.view(-1, d), norm.weight, norm.eps, out.view(-1, d), delta, index,
                                               null) else None

        return call

    def _chain(self, members, x, y) -> Chain | None:
        links, keep = [], []
        for step, tensors in members:
            entry = self._records.get(id(step.pool))
            name = self._chainable.get(step.pool.family)
            if entry is None or entry[0] is not step.pool or name is None:
                return None
            kernel = getattr(self, name)(tensors, step, x.shape[-1], y.shape[-1])
            link = kernel and kernel.link(x.dtype, x.shape[-1], y.shape[-1], entry[1])
            if link is None:
                return None
            links.append(link)
            keep += [kernel, entry[1]]
        return Chain.build(links, x.shape[-1], y.shape[-1], x.dtype, keep)

    # The native kernels take (..., features) tensors as they come (no reshapes: a decode step makes one call
    # per adapted projection, and each reshape costs about 2 us of Python).
    def apply_additive(self, x, y, tensors, step):
        if self.native:
            kernel = self._bgmv(tensors, step, x.shape[-1], y.shape[-1])
            if kernel is not None and kernel(x.contiguous(), y, step.index, step.width, step.pool.null):
                return y
        return super().apply_additive(x, y, tensors, step)

    def apply_qadditive(self, x, y, tensors, step):
        if self.native:
            kernel = self._qbgmv(tensors, step, x.shape[-1], y.shape[-1])
            if kernel is not None and kernel(x.contiguous(), y, step.index, step.pool.null):
                return y
        return super().apply_qadditive(x, y, tensors, step)

    def embed_qadditive(self, ids, y, tensors, step):
        if self.native:
            H, V = y.shape[-1], step.pool.cfg.vocab_size
            kernel = self._qbgmv(tensors, step, H, V)
            out = y.contiguous().clone()
            if kernel is not None and kernel.embedding(ids.reshape(-1).contiguous(), out, step.index,
                                                       step.pool.null):
                return out
        return super().embed_qadditive(ids, y, tensors, step)

    def apply_elementwise(self, x, y, tensors, step):
        if self.native:
            kernel = self._road(tensors, step, x.shape[-1], y.shape[-1])
            if kernel is not None and kernel(y, step.index, step.pool.null):
                return y
        return super().apply_elementwise(x, y, tensors, step)

    def apply_norm(self, x, y, tensors, step):
        # one native pass instead of index_select + cast + addcmul, 61 times a step when a tenant has gains
        if self.native and y.is_contiguous():
            d = y.shape[-1]
            if native_norm_gain(x.reshape(-1, d), y.view(-1, d), tensors["delta"], step.index, step.pool.null):
                return y
        return super().apply_norm(x, y, tensors, step)

    def apply_sparse(self, x, y, tensors, step):
        if self.native:
            kernel = self._binding(tensors, lambda: BoundSparse.bind(tensors["values"], tensors["cols"],
                                                                     tensors["row_ptr"]))
            if kernel is not None and kernel(x.contiguous(), y, step.index, step.pool.null):
                return y
        return super().apply_sparse(x, y, tensors, step)

    def _few_tokens_per_adapter(self, step: PoolStep) -> bool:
        """Decode-like: the step's distinct adapters cover fewer than `segment_ratio` member tokens each."""
        n_members = step.index.shape[0] if step.members is None else step.members.shape[0]
        return step.distinct * self.segment_ratio > n_members

    def additive(self, x, y, A, B, step):
        # (the native BGMV path is taken in `apply_additive`, bound to the pool)
        # grouped_mm wants 16-byte strides: rank padded to a multiple of 8 (pool rows are zero past a slot's
        # rank, so padding is exact), feature sizes multiples of 8.
        r = -(-step.width // 8) * 8
        if (self.grouped and x.dtype in _GROUPED_DTYPES and r <= A.shape[1]
                and A.shape[2] % 8 == 0 and B.shape[2] % 8 == 0):
            return self._additive_grouped(x, y, A, B, step, r)
        return self._additive_fallback(x, y, A, B, step)

    @staticmethod
    def _additive_grouped(x, y, A, B, step, r):
        G = step.offs.numel()
        xs = x[step.order]  # (M, in) sorted by slot
        h = torch._grouped_mm(xs, A[:G, :r].transpose(1, 2).to(x.dtype), offs=step.offs)  # (M, r)
        delta = torch._grouped_mm(h, B[:G, :r].to(x.dtype), offs=step.offs)  # (M, out)
        return y.index_add(0, step.order, delta)

    def _additive_fallback(self, x, y, A, B, step):
        r = step.width
        if not self._few_tokens_per_adapter(step):
            for slot, tok in step.segments:
                delta = (x[tok] @ A[slot, :r].t().to(x.dtype)) @ B[slot, :r].to(x.dtype)
                y = y.index_add(0, tok, delta)
            return y
        if step.members is None:
            idx, xs = step.index, x
        else:
            idx, xs = step.index[step.members], x[step.members]
        Ag = A[:, :r][idx].to(x.dtype)  # (M, r, in)
        Bg = B[:, :r][idx].to(x.dtype)  # (M, r, out)
        delta = torch.bmm(torch.bmm(xs[:, None, :], Ag.transpose(1, 2)), Bg)[:, 0]  # (M, out)
        if step.members is None:
            return y + delta
        return y.index_add(0, step.members, delta)

    def elementwise(self, y, c, s, step):
        # (the native RoAd path is taken in `apply_elementwise`, bound to the pool)
        # y * c[k] + rotate_half_G(y) * s[k], with the rotation written into one preallocated buffer and one
        # fused multiply-add: about 2x fewer passes over (N, out) than stack/cat (decode is op-overhead bound).
        idx = step.index
        N, out = y.shape
        h = step.pool.width // 2
        yg = y.reshape(N, -1, 2, h)
        rot = torch.empty_like(yg)
        torch.neg(yg[:, :, 1], out=rot[:, :, 0])
        rot[:, :, 1] = yg[:, :, 0]
        return torch.addcmul(y * c.index_select(0, idx).to(y.dtype), rot.view(N, out),
                             s.index_select(0, idx).to(y.dtype))


_GROUPED_DTYPES = (torch.float32, torch.bfloat16)


def _dense_slot(tensors: dict[str, Tensor], slot: int, in_f: int, out_f: int, group: int) -> tuple[Tensor, Tensor]:
    """A (r, in), B (r, out) fp32 of one slot of a qadditive pool module (`adapters.qadditive.dense_rows`)."""
    return dense_rows({n: t[slot] for n, t in tensors.items()}, in_f, out_f, group)


def _grouped_mm_works() -> bool:
    """Whether this torch build runs `_grouped_mm` on CPU (checked once, on a 2-group problem)."""
    try:
        out = torch._grouped_mm(torch.ones(3, 8), torch.ones(2, 8, 8), offs=torch.tensor([1, 3], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return out.shape == (3, 8) and bool((out == 8).all())


BACKENDS: Registry[type[Backend]] = Registry("backend")


def register_backend(cls: type[Backend]) -> type[Backend]:
    return BACKENDS.register(cls.name, cls)


def make_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: must be one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


register_backend(ReferenceBackend)
register_backend(CpuBackend)
