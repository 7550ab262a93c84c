"""Exact byte accounting of compressed deltas, and the band plan that fills a byte budget.

The ratio is over the whole delta (`compress.delta`): projections, tables and RMSNorm gains. Each compressed
module gets `floor(rho * out * in * 2)` bytes; the gains are stored exactly (fp16, their own fp16 size), so the
tables pay for them (`module_budgets`): the whole artifact stays within rho times the whole delta's fp16 bytes.

Every byte a method stores for one projection is counted: packed integer codes, fp16 scales and uint8 zero
points (3 bytes per quantization group), fp16 singular values, sparse indices and row pointers. The budget of
an (out, in) projection at ratio rho is `floor(rho * out * in * 2)` bytes, i.e. rho times its fp16 delta.

Band plan (Delta-CoMe, Ping et al. 2024, arXiv:2406.08903, Sec. 3.2-3.3): singular triplets in order of
decreasing singular value are cut into bands of decreasing bit width; a band's count is fixed or `*` (as many as
the remaining budget holds); the tail is dropped. The paper's default at 1/16 is `8:2,3:32,2:*`: on a
4096 x 4096 delta with its accounting (codes and Sigma only) that gives 2 + 32 + 968 vectors; ours also pays
for group scales and zero points, so the 2-bit band is a little shorter.

`auto` (our default; the paper evaluates 1/16 only): from 1/32 up, that allocation with the fixed bands'
counts scaled by ratio / (1/16) (1/8 -> `8:4,3:64,2:*`, 1/32 -> `8:1,3:16,2:*`); below 1/32 one 2-bit band
`2:*`. Each band pays U's group scales and zeros for every output row (3 bytes x out), a third of a 576 x 576
delta's 1/128 budget, so at small budgets rank beats bits: on the zoo's broad fine-tune (SmolLM2) mean KL at
1/64, 1/128, 1/256 was 8.9e-2, 2.9e-1, 3.7e-1 with the paper's plan, 5.2e-2, 1.6e-1, 3.3e-1 with scaled counts
and 3.7e-2, 1.1e-1, 2.7e-1 with `2:*` (results/compress/README.md). Those plans were compared with U grouped
along the rank (`u_groups='rank'`); grouped along out, extra bands cost little and the comparison is not redone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from deltafleet.adapters.qlowrank import BAND_BITS, FP16_BITS
from deltafleet.adapters.sparse import index_bytes
from deltafleet.store.quantized import num_groups, packed_nbytes

GROUP_BYTES = 3  # fp16 scale + uint8 zero point


def parse_ratio(text: str | float) -> float:
    """'1/16', '0.0625' or a float -> a ratio in (0, 1]."""
    try:
        value = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"ratio={text!r}: must be a fraction like 1/16 or a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise ValueError(f"ratio={text!r}: must lie in (0, 1]")
    return value


def fp16_bytes(out_f: int, in_f: int) -> int:
    return out_f * in_f * 2


def budget_bytes(out_f: int, in_f: int, ratio: float) -> int:
    return math.floor(ratio * fp16_bytes(out_f, in_f))


def module_budgets(shapes: dict[tuple[int, str], tuple[int, int]], tables: set[tuple[int, str]], gains_bytes: int,
                   ratio: float) -> dict[tuple[int, str], int]:
    """Bytes per compressed module, key -> budget: rho times its fp16 delta; the `tables` (keys of `shapes`) also
    get rho times an equal share of the gains' fp16 bytes and give up that share in full (the gains' stored
    bytes). Without tables the gains are not charged to any module."""
    share = -(-gains_bytes // len(tables)) if tables else 0
    return {k: math.floor(ratio * (fp16_bytes(o, i) + (share if k in tables else 0))) - (share if k in tables else 0)
            for k, (o, i) in shapes.items()}


# ------------------------------------------------------------------------------------------ band plans
@dataclass(frozen=True)
class Band:
    """`count` singular triplets at `bits` bits; count None: as many as the remaining budget holds."""

    bits: int
    count: int | None

    def __post_init__(self) -> None:
        if self.bits not in BAND_BITS:
            raise ValueError(f"band bits={self.bits!r}: must be one of {BAND_BITS}")
        if self.count is not None and (not isinstance(self.count, int) or self.count < 1):
            raise ValueError(f"band count={self.count!r}: must be a positive integer or '*'")


PAPER_PLAN = "8:2,3:32,2:*"
PAPER_RATIO = 1 / 16
AUTO_PLAN = "auto"
ALLOC_PLAN = "alloc"  # not a fixed plan: `compress.alloc` chooses the bands of each module shape
AUTO_MIN_SCALE = 1 / 2  # below ratio 1/32 `auto` is AUTO_LOW_PLAN
AUTO_LOW_PLAN = "2:*"


def resolve_plan(text: str, ratio: float) -> tuple[Band, ...]:
    """The bands of plan `text` at `ratio`: 'auto': see the module docstring."""
    if text.strip() != AUTO_PLAN:
        return parse_plan(text)
    scale = ratio / PAPER_RATIO
    if scale < AUTO_MIN_SCALE:
        return parse_plan(AUTO_LOW_PLAN)
    bands = []
    for band in parse_plan(PAPER_PLAN):
        count = None if band.count is None else math.floor(band.count * scale + 1e-9)
        if count != 0:
            bands.append(Band(band.bits, count))
    return tuple(bands)


def parse_plan(text: str) -> tuple[Band, ...]:
    """'8:2,3:32,2:*' -> bands, highest bit width first; bit widths must strictly decrease."""
    if text.strip() == AUTO_PLAN:
        return resolve_plan(text, PAPER_RATIO)
    bands = []
    for part in text.split(","):
        bits, sep, count = part.strip().partition(":")
        if not sep or not bits.strip().isdigit() or not (count.strip() == "*" or count.strip().isdigit()):
            raise ValueError(f"plan={text!r}: each band must read BITS:COUNT or BITS:* (e.g. 8:2,3:32,2:*)")
        bands.append(Band(int(bits), None if count.strip() == "*" else int(count)))
    if any(b.bits >= a.bits for a, b in zip(bands, bands[1:], strict=False)):
        raise ValueError(f"plan={text!r}: bit widths must strictly decrease")
    if any(b.count is None for b in bands[:-1]):
        raise ValueError(f"plan={text!r}: only the last band may be '*'")
    return tuple(bands)


def band_bytes(out_f: int, in_f: int, bits: int, rank: int, group_size: int, u_groups: str = "rank") -> int:
    """Stored bytes of one band of `rank` triplets (V^T, U and S)."""
    if rank == 0:
        return 0
    if bits == FP16_BITS:
        return 2 * rank * (out_f + in_f + 1)
    v = packed_nbytes(rank * in_f, bits) + rank * num_groups(in_f, group_size) * GROUP_BYTES
    u_groups_n = out_f * num_groups(rank, group_size) if u_groups == "rank" else rank * num_groups(out_f, group_size)
    u = packed_nbytes(out_f * rank, bits) + u_groups_n * GROUP_BYTES
    return v + u + 2 * rank


def plan_ranks(out_f: int, in_f: int, budget: int, plan: tuple[Band, ...],
               group_size: int, u_groups: str = "rank") -> tuple[tuple[int, int], ...]:
    """The (bits, rank) of each non-empty band that fits `budget` bytes; total rank <= min(out, in)."""
    left_rank, left_bytes, out = min(out_f, in_f), budget, []
    for band in plan:
        r = left_rank if band.count is None else min(band.count, left_rank)
        r = _largest_fitting(out_f, in_f, band.bits, r, left_bytes, group_size, u_groups)
        if r > 0:
            out.append((band.bits, r))
            left_rank -= r
            left_bytes -= band_bytes(out_f, in_f, band.bits, r, group_size, u_groups)
    return tuple(out)


def _largest_fitting(out_f: int, in_f: int, bits: int, hi: int, limit: int, group_size: int,
                     u_groups: str = "rank") -> int:
    """Largest r in [0, hi] with band_bytes(r) <= limit (band_bytes is non-decreasing in r)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if band_bytes(out_f, in_f, bits, mid, group_size, u_groups) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def bands_bytes(out_f: int, in_f: int, ranks: tuple[tuple[int, int], ...], group_size: int,
                u_groups: str = "rank") -> int:
    return sum(band_bytes(out_f, in_f, bits, r, group_size, u_groups) for bits, r in ranks)


# ------------------------------------------------------------------------------------------ other methods
def bitdelta_bytes(out_f: int, in_f: int) -> int:
    """One sign bit per weight, packed 8 per byte, plus one fp16 scale."""
    return packed_nbytes(out_f * in_f, 1) + 2


def sparse_bytes(out_f: int, in_f: int, nnz: int) -> int:
    """CSR: fp16 values and column indices (nnz each) plus int32 row pointers (out + 1)."""
    return nnz * (2 + index_bytes(in_f)) + 4 * (out_f + 1)


def sparse_nnz(out_f: int, in_f: int, budget: int) -> int:
    """Most entries a CSR delta can keep within `budget` bytes (0 when even the row pointers do not fit)."""
    return max(0, min(out_f * in_f, (budget - 4 * (out_f + 1)) // (2 + index_bytes(in_f))))
