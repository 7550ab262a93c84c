"""Block-wise calibration helpers shared by the quantizers (GPTQ, ApiQ): attention inputs for full windows and
the residual stream entering block 0. The text and its token windows come from `deltafleet.tasks.text`."""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.models.llama import AttentionInputs, Transformer


def attention_inputs(model: Transformer, batch: int, seq_len: int, dtype: torch.dtype) -> AttentionInputs:
    """Causal, cache-free attention inputs for `batch` full windows of `seq_len` tokens (shared by every block)."""
    positions = torch.arange(seq_len).expand(batch, seq_len)
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    return model._attention_inputs(positions, valid, None, None, dtype)


@torch.no_grad()
def embed(model: Transformer, windows: Tensor) -> Tensor:
    """The residual stream entering block 0: (N, T) ids -> (N, T, H) fp32."""
    return model.model.embed_tokens(windows).float()
