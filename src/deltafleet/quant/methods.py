"""The base quantizers rtn and gptq; importing this module registers every quantizer (rtn, gptq, loftq, apiq).

- `rtn`: group-wise round-to-nearest of each projection's weight (`functional.rtn_quantize`); no calibration.
  Fine-tuning it from a zero LoRA is the QLoRA-style start (Dettmers et al. 2023, arXiv 2305.14314, with our
  uniform asymmetric quantizer instead of NF4).
- `gptq`: GPTQ (Frantar et al. 2023, arXiv 2210.17323, Alg. 1; `functional.gptq_quantize`) applied block by block
  as in the paper's sequential mode: the Hessian of each projection's input is collected on the calibration
  stream that has passed through the already-quantized earlier blocks, the seven projections of the block are
  quantized (q/k/v and gate/up share a Hessian), and the block's quantized output feeds the next block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from deltafleet.models.config import PROJECTIONS
from deltafleet.models.llama import Transformer
from deltafleet.quant.calib import attention_inputs, embed
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.functional import gptq_quantize, hessian
from deltafleet.quant.registry import Quantizer, QuantResult, register_quantizer
from deltafleet.store.quantized import QuantizedMatrix


def _rtn(model: Transformer, cfg: QuantConfig, calib: Tensor | None,
        progress: Callable[[str], None], ctx=None) -> QuantResult:
    matrices = {}
    for layer in range(model.config.num_layers):
        for proj in PROJECTIONS:
            w = model.linear(layer, proj).weight.detach()
            matrices[(layer, proj)] = QuantizedMatrix.quantize(w, cfg.bits, cfg.group_size)
    return QuantResult(matrices)


def with_weights(block: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A copy of decoder `block` whose named projections use `weights` (R, C) instead of their own."""
    out = copy.deepcopy(block)
    for proj, w in weights.items():
        parent = out.self_attn if hasattr(out.self_attn, proj) else out.mlp
        getattr(parent, proj).weight.data = w.to(getattr(parent, proj).weight.dtype)
    return out


@torch.no_grad()
def _gptq(model: Transformer, cfg: QuantConfig, calib: Tensor | None,
        progress: Callable[[str], None], ctx=None) -> QuantResult:
    N, T = calib.shape
    x = embed(model, calib)  # (N, T, H) the quantized model's stream
    a = attention_inputs(model, N, T, x.dtype)
    matrices = {}
    for layer, block in enumerate(model.model.layers):
        H: dict[str, Tensor] = {}

        def collect(_layer: int, proj: str, xin: Tensor, y: Tensor, H=H) -> Tensor:
            H[proj] = H.get(proj, 0) + hessian(xin)
            return y

        block(x, a, collect)
        deq = {}
        for proj in PROJECTIONS:
            w = model.linear(layer, proj).weight.detach()
            qm = QuantizedMatrix.from_codes(*gptq_quantize(w, H[proj], cfg.bits, cfg.group_size, damp=cfg.gptq_damp,
                                                           act_order=cfg.gptq_act_order), cfg.bits, cfg.group_size)
            matrices[(layer, proj)] = qm
            deq[proj] = qm.dequantize()
        x = with_weights(block, deq)(x, a, None)
        progress(f"gptq: block {layer + 1}/{len(model.model.layers)}")
    return QuantResult(matrices)


register_quantizer(Quantizer("rtn", False, False, _rtn, "round to nearest, group-wise asymmetric"))
register_quantizer(Quantizer("gptq", True, False, _gptq, "GPTQ, block-sequential on calibration text"))

