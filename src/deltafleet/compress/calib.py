"""Calibration activations: the base model run on calibration text, H = sum x x^T per projection input.

Delta-CoMe (arXiv:2406.08903, Sec. 3.3) quantizes V with the Hessian of the layer input x and U with that of
x (S V^T)^T; the latter is S V^T H V S, so only H of each projection's input is captured. Projections that read
the same input share one H: q/k/v (attention input), gate/up (MLP input), o and down (their own inputs).
The run is bounded (by default 16 sequences of 128 tokens) and uses the BASE model, once; the paper folds each
quantized layer back before calibrating the next (`post_quant`), which this simpler single pass does not.

The LM head's input (the final hidden states) is captured too, under `(MODEL_LAYER, "lm_head")`: a tied table
delta is quantized with it (its use at the embedding lookup, a one-hot input, is not weighted).

The calibration ids come from `deltafleet.tasks.text.calibration_ids` (the Shakespeare train plays or a text file).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.models.config import MODEL_LAYER
from deltafleet.models.llama import Transformer
from deltafleet.quant.functional import hessian

LM_HEAD = (MODEL_LAYER, "lm_head")
INPUT_GROUP = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
               "up_proj": "mlp", "down_proj": "down"}


@torch.no_grad()
def capture_hessians(model: Transformer, ids: Tensor, batch_size: int = 4) -> dict[tuple[int, str], Tensor]:
    """ids (N, T) -> H[(layer, proj)] (in, in) fp32, summed over all N*T tokens; shared tensors per INPUT_GROUP."""
    acc: dict[tuple[int, str], Tensor] = {}

    def hook(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
        if layer == MODEL_LAYER:
            if proj == "lm_head":
                h = hessian(x)
                acc[LM_HEAD] = h if LM_HEAD not in acc else acc[LM_HEAD] + h
            return y
        key = (layer, INPUT_GROUP[proj])
        if proj in ("q_proj", "o_proj", "gate_proj", "down_proj"):  # first reader of each input
            h = hessian(x)
            acc[key] = h if key not in acc else acc[key] + h
        return y

    hook.model_level = True
    for i in range(0, ids.shape[0], batch_size):
        model(ids[i:i + batch_size], hook=hook)
    out = {(layer, proj): acc[(layer, INPUT_GROUP[proj])] for layer in range(model.config.num_layers)
           for proj in INPUT_GROUP}
    out[LM_HEAD] = acc[LM_HEAD]
    return out
