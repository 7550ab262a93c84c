"""The quantized additive serving family ('qadditive'): y += B^T (A x), A (R, in), B (R, out), with A and B kept in
their stored, quantized form in the slot and dequantized row by row as a decode step reads them (Delta-CoMe's
mixed-precision low-rank deltas, Ping et al. 2024, sec. 3, served as stored: a 2-bit band streams 2 bits a weight,
not the 16 of an expanded bf16 copy). The fused kernel is `native/qlora_cpu.c`; `dense_rows` is its reference.

One module's slot contents (`ServingParams` tensors; R rows, G the group size, gi = ceil(in / G),
go = ceil(out / G)):
    bits  (R,) uint8    each row's bit width, one of `QBITS` (16: fp16 values); rows of equal width are adjacent
    aoff, boff (R,) int64   byte offset of row j of A, of B, in `data`
    data  (D,) uint8    the rows: little-endian bit streams of codes (`store.quantized`), or fp16 values
    ascale, abias (R, gi), bscale, bbias (R, go) float32   per group: w = code * scale + bias

so a row of A is, column c in group g: A[j, c] = code_j(c) * ascale[j, g] + abias[j, g]. A slot's rows past its
own are bits 0 (the pool's zero rows): no row, nothing read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from deltafleet.store.quantized import fast_unpack

QADDITIVE = "qadditive"
QBITS = (2, 3, 4, 8, 16)
FP16 = 16
QTENSORS = ("bits", "aoff", "boff", "data", "ascale", "abias", "bscale", "bbias")
DATA_PAD = 32  # readable bytes after a slot's last row (the kernel's widest block read past a row's end)


@dataclass(frozen=True)
class QRows:
    """r rows of one matrix (A: (r, in), or B: (r, out)) at one bit width: `data` the r rows' bytes, row after row
    (each exactly C * bits / 8 bytes), `scale`, `bias` (r, ceil(C / G)) float32."""

    bits: int
    data: Tensor
    scale: Tensor
    bias: Tensor

    @property
    def rows(self) -> int:
        return self.scale.shape[0]


def row_nbytes(columns: int, bits: int) -> int:
    if bits not in QBITS:
        raise ValueError(f"bits={bits!r}: a quantized additive row has one of {QBITS} bits")
    if columns * bits % 8:
        raise ValueError(f"{columns} columns of {bits} bits are not a whole number of bytes")
    return columns * bits // 8


def pack_module(a_bands: list[QRows], b_bands: list[QRows], in_f: int, out_f: int) -> dict[str, Tensor]:
    """One module's slot tensors from its bands (band i of A pairs with band i of B: same bits, same rows)."""
    if [(a.bits, a.rows) for a in a_bands] != [(b.bits, b.rows) for b in b_bands]:
        raise ValueError("the bands of A and of B must have the same bit widths and row counts")
    for bands, cols in ((a_bands, in_f), (b_bands, out_f)):
        for band in bands:
            step = row_nbytes(cols, band.bits)
            if band.data.numel() != step * band.rows:
                raise ValueError(f"a {band.bits}-bit band of {band.rows} rows of {cols} columns holds "
                                 f"{band.data.numel()} bytes, not {step * band.rows}")
    bits, aoff, boff = _layout(tuple((a.bits, a.rows) for a in a_bands), in_f, out_f)
    return {"bits": bits, "aoff": aoff, "boff": boff,
            "data": torch.cat([band.data.reshape(-1) for band in (*a_bands, *b_bands)]),
            "ascale": torch.cat([b.scale for b in a_bands]).float().contiguous(),
            "abias": torch.cat([b.bias for b in a_bands]).float().contiguous(),
            "bscale": torch.cat([b.scale for b in b_bands]).float().contiguous(),
            "bbias": torch.cat([b.bias for b in b_bands]).float().contiguous()}


@lru_cache(maxsize=1024)
def _layout(bands: tuple[tuple[int, int], ...], in_f: int, out_f: int) -> tuple[Tensor, Tensor, Tensor]:
    """bits (R,), aoff (R,), boff (R,) of a module whose bands are (bits, rows): A's rows first, then B's, each row
    whole bytes. One plan's modules share these (read-only; a slot write copies them): a whole fine-tune has 30
    modules of each projection's plan, and building them per module was a tenth of a load."""
    bits, aoff, boff, pos = [], [], [], 0
    for cols, offs in ((in_f, aoff), (out_f, boff)):
        for b, rows in bands:
            step = row_nbytes(cols, b)
            offs.extend(range(pos, pos + step * rows, step))
            pos += step * rows
    for b, rows in bands:
        bits.extend([b] * rows)
    return (torch.tensor(bits, dtype=torch.uint8), torch.tensor(aoff, dtype=torch.int64),
            torch.tensor(boff, dtype=torch.int64))


def _dense(data: Tensor, off: int, bits: int, columns: int, scale: Tensor, bias: Tensor, group: int) -> Tensor:
    """One row, fp32 (columns,)."""
    raw = data[off: off + row_nbytes(columns, bits)]
    if bits == FP16:
        codes = raw.contiguous().view(torch.float16).float()
    else:
        codes = fast_unpack(raw.contiguous(), bits, columns).float()
    g = torch.arange(columns) // group
    return codes * scale[g] + bias[g]


def dense_rows(t: dict[str, Tensor], in_f: int, out_f: int, group: int) -> tuple[Tensor, Tensor]:
    """The reference: one slot's module tensors (as in the module docstring, rows past the slot's own are bits 0)
    -> A (r, in), B (r, out) fp32, r = the slot's rows."""
    bits = t["bits"].tolist()
    r = bits.index(0) if 0 in bits else len(bits)
    A = [_dense(t["data"], int(t["aoff"][j]), bits[j], in_f, t["ascale"][j], t["abias"][j], group) for j in range(r)]
    B = [_dense(t["data"], int(t["boff"][j]), bits[j], out_f, t["bscale"][j], t["bbias"][j], group) for j in range(r)]
    if not r:
        return torch.zeros(0, in_f), torch.zeros(0, out_f)
    return torch.stack(A), torch.stack(B)
