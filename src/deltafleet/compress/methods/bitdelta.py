"""BitDelta (Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit", NeurIPS 2024, arXiv:2402.10193,
Sec. 3.1-3.2): Delta_hat = alpha * sign(Delta), one fp16 alpha per matrix, initialised to mean|Delta| (the
Frobenius-optimal scale); signs packed 8 per byte.

Scale distillation (optional, `distill_steps > 0`): the signs stay frozen and the alphas are trained with Adam
to match the fine-tuned model's logits by mean squared error on calibration text (the paper: 200 steps, batch 4,
lr 1e-4, on C4). The fine-tuned model is the base run with the exact deltas added to each projection (and the
exact extras swapped in), so only one copy of the weights is held.

Size: 1 bit per weight plus 2 bytes, i.e. ratio 1/16 + 2 bytes per matrix; a smaller ratio is refused.
The engine does not serve bitdelta (it would need a binary GEMM): it is an export/merge baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.adapters import Adapter
from deltafleet.adapters.bitdelta import BitDeltaConfig, pack_signs
from deltafleet.compress.budget import bitdelta_bytes, fp16_bytes
from deltafleet.compress.delta import DeltaSet, swapped_extras
from deltafleet.compress.methods.base import CompressSettings, Context, Method, register_method
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.llama import Transformer


def distill_scales(model: Transformer, deltas: dict[tuple[int, str], Tensor], signs: dict[tuple[int, str], Tensor],
                   alpha: dict[tuple[int, str], float], ids: Tensor, steps: int, lr: float,
                   batch_size: int = 4) -> tuple[dict[tuple[int, str], float], list[float]]:
    """Train the per-matrix scales; returns them and the loss of each step. ids (N, T) calibration tokens."""
    keys = sorted(alpha)
    index = {k: i for i, k in enumerate(keys)}
    a = torch.nn.Parameter(torch.tensor([alpha[k] for k in keys]))
    opt = torch.optim.Adam([a], lr=lr)

    def teacher(layer, proj, x, y):
        return y + x @ deltas[(layer, proj)].t()

    def student(layer, proj, x, y):
        return y + a[index[(layer, proj)]] * (x @ signs[(layer, proj)].t())

    for p in model.parameters():
        p.requires_grad_(False)
    losses = []
    for step in range(steps):
        j = (step * batch_size) % ids.shape[0]
        batch = ids[j:j + batch_size]
        with torch.no_grad():
            target = model(batch, hook=teacher)
        loss = torch.nn.functional.mse_loss(model(batch, hook=student), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {k: float(a[index[k]].detach()) for k in keys}, losses


@torch.no_grad()
def distill_loss(model: Transformer, deltas: dict[tuple[int, str], Tensor], signs: dict[tuple[int, str], Tensor],
                 alpha: dict[tuple[int, str], float], ids: Tensor) -> float:
    """Mean squared logit error of alpha * signs against the exact deltas on ids (N, T)."""
    target = model(ids, hook=lambda layer, proj, x, y: y + x @ deltas[(layer, proj)].t())
    pred = model(ids, hook=lambda layer, proj, x, y: y + alpha[(layer, proj)] * (x @ signs[(layer, proj)].t()))
    return float(torch.nn.functional.mse_loss(pred, target))


class BitDelta(Method):
    name = "bitdelta"
    servable = False
    slack_bytes = 2  # the scale on top of exactly 1/16
    charges_gains = False  # 1 bit per weight whatever the budget: the exact gains come on top of the ratio
    needs_calibration = staticmethod(lambda s: s.distill_steps > 0)

    def compress(self, ds: DeltaSet, s: CompressSettings, ctx: Context) -> Adapter:
        for (o, i), b in ds.shape_budgets(s.ratio, charge_gains=False).items():
            if bitdelta_bytes(o, i) > b + self.slack_bytes:
                raise DeltafleetError(f"ratio={s.ratio:.6g}: bitdelta stores 1 bit per weight plus a 2-byte scale "
                                      f"({bitdelta_bytes(o, i)} of {fp16_bytes(o, i)} bytes for a {o}x{i} delta); "
                                      f"it needs ratio >= 1/16")
        alpha = {k: float(d.abs().mean()) for k, d in ds.deltas.items()}
        if s.distill_steps:
            if ctx.model is None or ctx.calib_ids is None:
                raise DeltafleetError("bitdelta scale distillation needs the base model and calibration text")
            signs = {k: torch.where(d >= 0, 1.0, -1.0) for k, d in ds.deltas.items()}
            with swapped_extras(ctx.model, ds.extras):
                alpha, _ = distill_scales(ctx.model, ds.deltas, signs, alpha, ctx.calib_ids, s.distill_steps,
                                          s.distill_lr)
        params = {}
        for k, d in ds.deltas.items():
            params[k] = {"signs": pack_signs(d), "scale": torch.tensor([alpha[k]]).half()}
            ctx.tick()
        return Adapter(BitDeltaConfig(targets=PROJECTIONS), params)


register_method(BitDelta())
