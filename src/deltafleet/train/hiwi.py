"""`deltafleet train --method hiwi`: HiWi (Liao, Meng & Monz, ACL 2023, arXiv 2305.16742, Sec. 3.2) on
transformers' Llama, adapting the RMSNorm gains (see `adapters.hiwi` for why the gains: they are a Llama's only
vector-shaped parameters, the analogue of the paper's biases).

One bottleneck adapter per kind of norm (`--targets`, default both of a decoder layer's norms), shared by that
norm in every layer, takes the pretrained gain g (H,) as its input: g' = g + U silu(D g + c) + e, D (r, H), U (H, r),
r = `hiwi_bottleneck`; U and e start at zero, so training starts at the base. The adapter sees the parameter, not
the hidden states, so a step costs what full fine-tuning of the norms costs and inference costs what the base costs.
After training the changed gains are computed once and exported as a `deltafleet-hiwi` tenant: delta = g' - g per
norm and layer, fp16 (2 x 30 x 576 values, 69 KB on SmolLM2); the adapter itself is not stored.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.hiwi import HiwiConfig
from deltafleet.adapters.hiwi.io import FORMAT, save_hiwi
from deltafleet.models.config import NORMS
from deltafleet.models.loading import resolve_base
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.train.registry import Method, register_method


class GainAdapter(nn.Module):
    """g (H,) -> the gain change U silu(D g + c) + e (H,); zero at initialisation."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, g: Tensor) -> Tensor:
        return self.up(F.silu(self.down(g)))


class HiwiNorm(nn.Module):
    """transformers' LlamaRMSNorm with the gain g + adapter(g)."""

    def __init__(self, norm: nn.Module, adapter: GainAdapter):
        super().__init__()
        self.norm, self.adapter = norm, adapter
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))

    def delta(self) -> Tensor:
        return self.adapter(self.norm.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.norm.weight + self.delta()).to(x.dtype) * h.to(x.dtype)


def prepare(model, cfg):
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = model.config.hidden_size
    model.hiwi = nn.ModuleDict({name: GainAdapter(hidden, cfg.hiwi_bottleneck) for name in cfg.targets})
    for block in model.model.layers:
        for name in cfg.targets:
            setattr(block, name, HiwiNorm(getattr(block, name), model.hiwi[name]))
    model.hiwi_info = {"config": HiwiConfig(targets=tuple(cfg.targets)), "base_model": cfg.base}
    return model


def hiwi_adapter(model) -> Adapter:
    """The trained tenant: each adapted norm's gain change, computed once."""
    params = {}
    with torch.no_grad():
        for layer, block in enumerate(model.model.layers):
            for name in NORMS:
                module = getattr(block, name)
                if isinstance(module, HiwiNorm):
                    params[(layer, name)] = {"delta": module.delta().detach().clone()}
    return Adapter(model.hiwi_info["config"], params)


def export(model, tokenizer, out: Path) -> str:
    base = model.hiwi_info["base_model"]
    save_hiwi(hiwi_adapter(model), out, base_fingerprint=base_fingerprint(resolve_base(base)), base_model=base)
    return FORMAT


register_method(Method("hiwi", "hiwi", 5e-3, NORMS, ("targets", "hiwi_bottleneck"), prepare, export))
