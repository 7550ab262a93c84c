"""ApiQ, block-wise (ApiQ-bw): Liao, Herold, Khadivi, Monz 2024, "ApiQ: Finetuning of 2-Bit Quantized Large
Language Model", arXiv 2402.05147 (sec. 3; the released code `BaohaoLiao/ApiQ`, `apiq/calibrate.py`).

Quantization error compounds through depth, so instead of preserving each layer's *weights* (QLoRA, LoftQ), ApiQ
initialises the quantizer and LoRA jointly to preserve *activations*. For decoder block i, in order:

    loss_i = MSE( f_fp_i(x_fp), f_q_i(x_q) )

f_fp_i is the full-precision block on the full-precision stream x_fp; f_q_i is the same block whose seven
projections compute y = x Q(W)^T + (alpha / r) x A^T B^T, run on the stream x_q that came out of the already
quantized-and-adapted blocks 0..i-1, so each block also compensates the error of the earlier ones. The weights W
stay fixed; trained are the learnable-weight-clipping (LWC, from OmniQuant) factors gamma, beta of every group
and the LoRA factors A (r, C), B (R, r) of the targeted projections:

    xmax = sigmoid(gamma) * max(W_g, 0),  xmin = sigmoid(beta) * min(W_g, 0)     (gamma = beta = 4.0 at start)
    scale = fp16((xmax - xmin) / (2^b - 1)),  zero = round(-xmin / scale)
    Q(W) = (clamp(round(W / scale) + zero, 0, 2^b - 1) - zero) * scale          (round: straight-through)

exactly `functional.group_params` / `quantize_with` / `dequantize` with clip factors sigmoid(gamma),
sigmoid(beta), so the stored base equals the trained fake-quantized one bit for bit (`lwc_fake_quant` is the
differentiable twin of `lwc_quantize`, and tests check they agree). AdamW, LWC lr 5e-3, LoRA lr 5e-4, weight decay
0.1, A Kaiming-uniform and B = 0 at start (peft's LoRA init). The paper's optional second loss term
MSE(f_fp(x_q), f_q(x_q)) and its AMP/GradScaler are not used (fp32 throughout). Calibration is scaled down
(see `QuantConfig`); the paper uses 128 x 2048 WikiText-2 tokens and 20 epochs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.models.config import PROJECTIONS
from deltafleet.models.llama import Transformer
from deltafleet.quant.calib import attention_inputs, embed
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.registry import Quantizer, QuantResult, register_quantizer
from deltafleet.store.quantized import QuantizedMatrix, group_params, num_groups, quantize_with


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """w (R, C) -> (R, G, gs); a short last group is padded with copies of its first column (range unchanged),
    as `functional.rtn_quantize` pads."""
    R, C = w.shape
    G = num_groups(C, group_size)
    pad = G * group_size - C
    if pad:
        first = w[:, (G - 1) * group_size: (G - 1) * group_size + 1]
        w = torch.cat([w, first.expand(R, pad)], dim=1)
    return w.reshape(R, G, group_size)


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def lwc_fake_quant(w: Tensor, gamma: Tensor, beta: Tensor, bits: int, group_size: int) -> Tensor:
    """Differentiable Q(W): w (R, C) fixed, gamma, beta (R, G) -> W_hat (R, C) fp32, STE through rounding."""
    R, C = w.shape
    maxq = (1 << bits) - 1
    g = _grouped(w.float(), group_size)  # (R, G, gs)
    xmax = torch.clamp(g.amax(-1), min=0) * torch.sigmoid(gamma)  # (R, G)
    xmin = torch.clamp(g.amin(-1), max=0) * torch.sigmoid(beta)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)[..., None]  # (R, G, 1)
    zero = torch.clamp(_round_ste(-xmin[..., None] / scale), 0, maxq)
    q = torch.clamp(_round_ste(g / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(R, -1)[:, :C]


@torch.no_grad()
def lwc_quantize(w: Tensor, gamma: Tensor, beta: Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """The stored form of `lwc_fake_quant`, through the shared primitives (`group_params`, `quantize_with`)."""
    R, C = w.shape
    g = _grouped(w.float(), group_size)
    G = g.shape[1]
    flat = g.reshape(R * G, group_size)
    scale, zero = group_params(flat, bits, torch.sigmoid(gamma.float()).reshape(-1),
                               torch.sigmoid(beta.float()).reshape(-1))
    codes = quantize_with(flat, scale, zero, bits).reshape(R, G * group_size)[:, :C]
    return QuantizedMatrix.from_codes(codes.to(torch.uint8), scale.reshape(R, G), zero.reshape(R, G), bits,
                                      group_size)


class LwcLoraLinear(nn.Module):
    """y = x Q(W)^T + b + scaling * x A^T B^T with W, b fixed and gamma, beta (and A, B when `rank`) trained."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, clip_init: float, rank: int | None,
                 scaling: float):
        super().__init__()
        R, C = linear.weight.shape
        G = num_groups(C, group_size)
        self.bits, self.group_size, self.scaling = bits, group_size, scaling
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.gamma = nn.Parameter(torch.full((R, G), clip_init))
        self.beta = nn.Parameter(torch.full((R, G), clip_init))
        self.lora_A = self.lora_B = None
        if rank:
            A = torch.empty(rank, C)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # peft's LoRA A init
            self.lora_A = nn.Parameter(A)
            self.lora_B = nn.Parameter(torch.zeros(R, rank))

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, lwc_fake_quant(self.weight, self.gamma, self.beta, self.bits, self.group_size), self.bias)
        if self.lora_A is not None:
            y = y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    def quantized(self) -> QuantizedMatrix:
        return lwc_quantize(self.weight, self.gamma, self.beta, self.bits, self.group_size)


def _swap(block: nn.Module, cfg: QuantConfig) -> tuple[nn.Module, dict[str, LwcLoraLinear]]:
    qblock = copy.deepcopy(block)
    for p in qblock.parameters():
        p.requires_grad_(False)
    mods = {}
    for proj in PROJECTIONS:
        parent = qblock.self_attn if hasattr(qblock.self_attn, proj) else qblock.mlp
        mods[proj] = LwcLoraLinear(getattr(parent, proj), cfg.bits, cfg.group_size, cfg.apiq_clip_init,
                                   cfg.rank if proj in cfg.targets else None, cfg.scaling)
        setattr(parent, proj, mods[proj])
    return qblock, mods


def calibrate_block(block: nn.Module, x_fp_out: Tensor, x_q: Tensor, cfg: QuantConfig, inputs_for: Callable,
                    generator: torch.Generator) -> tuple[nn.Module, dict[str, LwcLoraLinear], list[float]]:
    """Train one block's LWC and LoRA so that qblock(x_q) matches x_fp_out (N, T, H); returns per-epoch losses."""
    qblock, mods = _swap(block, cfg)
    lwc = [p for m in mods.values() for p in (m.gamma, m.beta)]
    lora = [p for m in mods.values() if m.lora_A is not None for p in (m.lora_A, m.lora_B)]
    groups = [{"params": lwc, "lr": cfg.apiq_lr_lwc}] + ([{"params": lora, "lr": cfg.apiq_lr_lora}] if lora else [])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.apiq_weight_decay)
    N = x_q.shape[0]
    losses = []
    for _ in range(cfg.apiq_epochs):
        order = torch.randperm(N, generator=generator)
        total = 0.0
        for i in range(0, N, cfg.apiq_batch_size):
            idx = order[i: i + cfg.apiq_batch_size]
            loss = F.mse_loss(qblock(x_q[idx], inputs_for(len(idx)), None), x_fp_out[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / N)
    return qblock, mods, losses


def _apiq(model: Transformer, cfg: QuantConfig, calib: Tensor | None,
        progress: Callable[[str], None], ctx=None) -> QuantResult:
    N, T = calib.shape
    cache: dict[int, object] = {}

    def inputs_for(b: int):
        if b not in cache:
            cache[b] = attention_inputs(model, b, T, torch.float32)
        return cache[b]

    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    x_fp = embed(model, calib)  # (N, T, H) full-precision stream
    x_q = x_fp.clone()  # quantized-and-adapted stream
    matrices, lora = {}, {}
    first, last = [], []
    for layer, block in enumerate(model.model.layers):
        t0 = time.perf_counter()
        with torch.no_grad():
            fp_out = block(x_fp, inputs_for(N), None)
        qblock, mods, losses = calibrate_block(block, fp_out, x_q, cfg, inputs_for, gen)
        with torch.no_grad():
            x_q = qblock(x_q, inputs_for(N), None)
            for proj, m in mods.items():
                matrices[(layer, proj)] = m.quantized()
                if m.lora_A is not None:
                    lora[(layer, proj)] = (m.lora_A.detach().clone(), m.lora_B.detach().clone())
        x_fp = fp_out
        first.append(losses[0])
        last.append(losses[-1])
        progress(f"apiq: block {layer + 1}/{len(model.model.layers)} loss {losses[0]:.3e} -> {losses[-1]:.3e} "
                 f"({time.perf_counter() - t0:.1f} s)")
    stats = {"block_loss_first_epoch": first, "block_loss_last_epoch": last}
    return QuantResult(matrices, lora, stats)


register_quantizer(Quantizer("apiq", True, True, _apiq, "ApiQ-bw: block-wise LWC + LoRA activation matching"))
