"""`deltafleet train --method pafi`: PaFi sparse fine-tuning (Liao, Meng & Monz, ACL 2023, arXiv 2305.16742,
Sec. 3.1) on transformers' Llama.

The mask is a function of the base alone: per target projection, the `pafi_density` fraction of entries with the
smallest |W| (`adapters.pafi.functional.magnitude_mask`). It is computed once per (base, density), kept in the
content-addressed mask cache (`adapters.pafi.mask`) and found again through a small index, so every tenant of
that base trains and stores the same coordinates.

Memory: each target `nn.Linear` becomes a `PafiLinear` whose only trainable tensor is `values` (nnz,); the
optimizer state is therefore 2 x nnz floats. Its autograd function saves the input and references to the frozen
weight and values (no weight copy): the forward and backward each build W + dW transiently, and the gradient of
the values is g^T x sampled at the mask only (`torch.sparse.sampled_addmm`, an SDDMM: no dense (out, in) product).
Exported as a `deltafleet-pafi` tenant (`adapters.pafi.io`): fp16 values only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.pafi.functional import PafiConfig, flat_index
from deltafleet.adapters.pafi.io import FORMAT, save_pafi
from deltafleet.adapters.pafi.mask import Mask, build_mask, load_mask, save_mask
from deltafleet.errors import DeltafleetError
from deltafleet.models.loading import resolve_base
from deltafleet.store.cache import cache_dir
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.train.registry import Method, register_method


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x (W + dW)^T + b with dW = scatter(values at flat); grads for x and values only."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, values: Tensor, flat: Tensor,
                pattern: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, values, flat)
        ctx.pattern = pattern
        w = weight.flatten().index_add(0, flat, values.to(weight.dtype)).view_as(weight)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g: Tensor):
        x, weight, values, flat = ctx.saved_tensors
        w = weight.flatten().index_add(0, flat, values.to(weight.dtype)).view_as(weight)
        grad_x = g @ w.to(g.dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
        # (g^T x) sampled at the mask only (SDDMM): 3x faster than the dense (out, in) product at density 0.02
        grad_values = torch.sparse.sampled_addmm(ctx.pattern, g2.t().contiguous(), x2, beta=0.0).values()
        return grad_x, None, None, grad_values.to(values.dtype), None, None


class PafiLinear(nn.Module):
    """A frozen `nn.Linear` plus trainable values on the shared mask (cols, row_ptr)."""

    def __init__(self, base: nn.Linear, cols: Tensor, row_ptr: Tensor):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.cols, self.row_ptr = cols, row_ptr
        self.register_buffer("flat", flat_index(cols, row_ptr, base.in_features), persistent=False)
        self.values = nn.Parameter(torch.zeros(cols.numel()))
        # The mask as a CSR tensor (zero values): the pattern the values' gradient is sampled at.
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.pattern = torch.sparse_csr_tensor(row_ptr.long(), cols.long(), torch.zeros(cols.numel()),
                                                   tuple(base.weight.shape), check_invariants=False)

    def forward(self, x: Tensor) -> Tensor:
        return _SparseDeltaLinear.apply(x, self.base.weight, self.base.bias, self.values, self.flat, self.pattern)


def _linear(model, layer: int, proj: str) -> tuple[nn.Module, str]:
    block = model.model.layers[layer]
    parent = block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
    return parent, proj


def _index_path(fingerprint: str, density: float, targets: tuple[str, ...]) -> Path:
    name = f"{fingerprint.replace('sha256:', '')}-{density!r}-{'.'.join(sorted(targets))}.json"
    return cache_dir() / "pafi-masks" / "by-base" / name


def base_mask(model, base: str, density: float, targets: tuple[str, ...]) -> tuple[str, Mask, str]:
    """(mask id, mask, base fingerprint) for the base's target projections: from the cache when this base and
    density were masked before, else computed from `model`'s weights and cached."""
    fingerprint = base_fingerprint(resolve_base(base))
    index = _index_path(fingerprint, density, targets)
    if index.is_file():
        try:
            mid = json.loads(index.read_text())["id"]
            return mid, load_mask(mid), fingerprint
        except (OSError, ValueError, KeyError, TypeError, DeltafleetError):
            pass  # a stale or damaged index entry: rebuild
    weights = {(i, proj): getattr(*_linear(model, i, proj)).weight
               for i in range(len(model.model.layers)) for proj in targets}
    mask = build_mask(weights, density)
    mid = save_mask(mask, density, fingerprint)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps({"id": mid, "base_fingerprint": fingerprint, "density": density}))
    return mid, mask, fingerprint


def prepare(model, cfg):
    """Freeze everything; replace each target projection with a `PafiLinear` over the base's mask."""
    for p in model.parameters():
        p.requires_grad_(False)
    mid, mask, fingerprint = base_mask(model, cfg.base, cfg.pafi_density, tuple(cfg.targets))
    for (layer, proj), (cols, row_ptr) in mask.items():
        parent, name = _linear(model, layer, proj)
        setattr(parent, name, PafiLinear(getattr(parent, name), cols, row_ptr))
    model.pafi = {"config": PafiConfig(targets=tuple(cfg.targets), density=cfg.pafi_density, mask=mid),
                  "base_fingerprint": fingerprint, "base_model": cfg.base}
    return model


def pafi_adapter(model) -> Adapter:
    """The trained tenant of a `prepare`d model."""
    params = {}
    for layer, block in enumerate(model.model.layers):
        for parent in (block.self_attn, block.mlp):
            for name, module in parent.named_children():
                if isinstance(module, PafiLinear):
                    params[(layer, name)] = {"values": module.values.detach().clone(), "cols": module.cols,
                                             "row_ptr": module.row_ptr}
    return Adapter(model.pafi["config"], params)


def export(model, tokenizer, out: Path) -> str:
    info = model.pafi
    save_pafi(pafi_adapter(model), out, base_fingerprint=info["base_fingerprint"], base_model=info["base_model"])
    return FORMAT


register_method(Method("pafi", "pafi", 1e-3, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"), ("targets", "pafi_density"), prepare, export))
