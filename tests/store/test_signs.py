"""OneBit's stored matrix: packing is exact and row-aligned, W_hat = h S g, and malformed tensors are refused by
name."""

from __future__ import annotations

import pytest
import torch

from deltafleet.store.signs import SignMatrix, pack_signs, row_bytes, unpack_signs


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (4, 9), (6, 64), (2, 1537)])
def test_pack_unpack_round_trip_is_exact_and_row_aligned(shape):
    R, C = shape
    w = torch.randn(shape, generator=torch.Generator().manual_seed(R * 1000 + C))
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (R, row_bytes(C))
    s = unpack_signs(packed, C)
    assert torch.equal(s, torch.where(w >= 0, 1.0, -1.0))
    assert torch.equal(pack_signs(s > 0), packed)  # bool input packs the same
    if C % 8:  # padding bits of each row's last byte are 0
        assert int((packed[:, -1].to(torch.int32) >> (C % 8)).max()) == 0
    # row r's signs live in row r's bytes only
    assert torch.equal(unpack_signs(packed[1:], C), s[1:]) if R > 1 else True


def test_sign_of_zero_is_plus_one():
    assert torch.equal(unpack_signs(pack_signs(torch.zeros(2, 3)), 3), torch.ones(2, 3))


def test_dequantize_is_h_s_g_and_bytes():
    g, h = torch.rand(10) + 0.1, torch.rand(4) + 0.1
    w = torch.randn(4, 10)
    sm = SignMatrix.from_factors(w, g, h)
    want = h.half().float()[:, None] * torch.where(w >= 0, 1.0, -1.0) * g.half().float()[None, :]
    assert torch.equal(sm.dequantize(), want)
    assert sm.nbytes == 4 * 2 + 10 * 2 + 4 * 2  # 4 rows x 2 bytes of signs, fp16 g (10,), fp16 h (4,)


def test_from_tensors_round_trip_and_refusals():
    sm = SignMatrix.from_factors(torch.randn(6, 13), torch.rand(13), torch.rand(6))
    t = sm.tensors("p")
    back = SignMatrix.from_tensors(t, "p", (6, 13))
    assert torch.equal(back.dequantize(), sm.dequantize())
    cases = {
        "missing": ({k: v for k, v in t.items() if k != "p.qin"}, r"tensor 'p.qin' is missing"),
        "shape": ({**t, "p.qsigns": torch.zeros(6, 3, dtype=torch.uint8)}, r"'p.qsigns' is torch.uint8 \(6, 3\)"),
        "dtype": ({**t, "p.qout": t["p.qout"].float()}, r"'p.qout' is torch.float32"),
        "nan": ({**t, "p.qin": torch.full((13,), float("nan"), dtype=torch.float16)}, "p.qin holds non-finite"),
        "inf": ({**t, "p.qout": torch.full((6,), float("inf"), dtype=torch.float16)}, "p.qout holds non-finite"),
        "padding": ({**t, "p.qsigns": t["p.qsigns"] | 0x80}, "bits set beyond column 13"),
    }
    for _name, (tensors, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            SignMatrix.from_tensors(tensors, "p", (6, 13))


def test_bad_inputs_to_the_packers_refused():
    with pytest.raises(ValueError, match="2-d"):
        pack_signs(torch.ones(3))
    with pytest.raises(ValueError, match=r"expected uint8 \(R, 2\)"):
        unpack_signs(torch.zeros(2, 1, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match=r"must be \(5,\) and \(2,\)"):
        SignMatrix.from_factors(torch.ones(2, 5), torch.ones(4), torch.ones(2))
