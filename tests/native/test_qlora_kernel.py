"""The native quantized BGMV (`native/qlora_cpu.c`) against its reference (`adapters.qadditive.dense_rows`, then the
additive formula in fp32): bands of every supported bit width in one slot, slots of different row counts, the null
row and empty slots untouched, fp32 and bf16 activations, the table's embedding lookup, the portable build; and the
qlowrank kind's quantized form equal to its expanded serving form."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltafleet import native
from deltafleet.adapters.qadditive import DATA_PAD, QBITS, dense_rows
from deltafleet.adapters.qlowrank import QLowRankConfig
from deltafleet.adapters.qlowrank.functional import QLowRankKind, qlowrank_factors
from tests.conftest import assert_close
from tests.native.builds import build_with

IN, OUT, G = 192, 320, 64
PLANS = [((16, 2), (8, 3), (4, 2), (3, 4), (2, 5)), ((2, 9),), ((3, 1), (2, 1))]


def _pool(plans, in_f=IN, out_f=OUT, group=G, seed=0):
    """A qadditive pool module holding one random qlowrank delta per plan (slot s = plan s), one empty slot and the
    null row last."""
    kind, g = QLowRankKind(), torch.Generator().manual_seed(seed)
    forms = []
    for plan in plans:
        cfg = QLowRankConfig(targets=("q_proj",), bands=((f"{out_f}x{in_f}", plan),), group_size=group,
                             u_groups="out")
        forms.append(kind.quantized_form(cfg, kind.init_params(cfg, out_f, in_f, identity=False, generator=g)))
    S, R = len(forms) + 2, max(f.width for f in forms) + 3
    D = max(f.tensors["data"].numel() for f in forms) + DATA_PAD
    gi, go = -(-in_f // group), -(-out_f // group)
    pool = {"bits": torch.zeros(S, R, dtype=torch.uint8), "aoff": torch.zeros(S, R, dtype=torch.int64),
            "boff": torch.zeros(S, R, dtype=torch.int64), "data": torch.zeros(S, D, dtype=torch.uint8),
            "ascale": torch.zeros(S, R, gi), "abias": torch.zeros(S, R, gi), "bscale": torch.zeros(S, R, go),
            "bbias": torch.zeros(S, R, go)}
    for s, f in enumerate(forms):
        r = f.width
        for name, t in f.tensors.items():
            if name == "data":
                pool[name][s, :t.numel()] = t
            else:
                pool[name][s, :r] = t
    return pool, S - 1  # the last row is the null row


def _dense(pool, k, in_f=IN, out_f=OUT, group=G):
    return dense_rows({n: t[k] for n, t in pool.items()}, in_f, out_f, group)


def _reference(pool, x, y, index, null, group=G):
    out = y.float().clone()
    for i, k in enumerate(index.tolist()):
        if k != null:
            A, B = _dense(pool, k, x.shape[1], y.shape[1], group)
            out[i] += (x[i].float() @ A.T) @ B
    return out


def test_kernel_builds_here():
    assert native.qlora("qlora_bgmv") is not None and native.qlora_path() in ("avx512_bf16", "avx2", "portable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qbgmv_matches_the_dequantized_reference(dtype):
    pool, null = _pool(PLANS)
    kernel = native.BoundQBgmv.bind(pool, IN, OUT, G)
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([0, 1, null, 2, 0, 3, 2, 1, null, 0, 1])  # slot 3 is empty
    x = torch.randn(len(index), IN, generator=g).to(dtype)
    y = torch.randn(len(index), OUT, generator=g).to(dtype)
    want = _reference(pool, x, y, index, null)
    got = y.clone()
    assert kernel(x, got, index, null)
    untouched = (index == null) | (index == 3)
    assert torch.equal(got[untouched], y[untouched])
    op = "reordered" if dtype is torch.float32 else "rounded"
    assert_close(got.float(), want, op, dtype, k=IN * 16, scale=float(want.abs().max()))
    assert not torch.equal(got[~untouched], y[~untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_of_one_slot_match_the_reference(dtype):
    """Consecutive tokens of one slot (prefill) share each row's dequantization: runs of 1 to 21 tokens (past the
    kernel's run length of 16), the null row and the empty slot between them."""
    pool, null = _pool(PLANS, seed=5)
    index = torch.tensor([0] * 21 + [1] * 3 + [null] * 2 + [2] + [3] * 2 + [1] * 17 + [0])
    g = torch.Generator().manual_seed(6)
    x = torch.randn(len(index), IN, generator=g).to(dtype)
    y = torch.randn(len(index), OUT, generator=g).to(dtype)
    got = y.clone()
    assert native.BoundQBgmv.bind(pool, IN, OUT, G)(x, got, index, null)
    want = _reference(pool, x, y, index, null)
    op = "reordered" if dtype is torch.float32 else "rounded"
    assert_close(got.float(), want, op, dtype, k=IN * 16, scale=float(want.abs().max()))
    untouched = (index == null) | (index == 3)
    assert torch.equal(got[untouched], y[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scattered_tokens_of_one_slot_are_grouped_and_match_the_reference(dtype):
    """A decode step's rows: a tenant's tokens scattered among others' (here 19 of slot 0, over the group length of
    16, and 5 of slot 2), each row dequantized once per group: the same answers, every token where it was; a
    token in the same slot as others and alone, the same answer."""
    pool, null = _pool(PLANS, seed=8)
    index = torch.tensor([0, 1, 0, null, 2, 0, 0, 3, 2, 0] + [0, 1] * 7 + [2, 0, 2, 0, 2] + [0])
    g = torch.Generator().manual_seed(9)
    x = torch.randn(len(index), IN, generator=g).to(dtype)
    y = torch.randn(len(index), OUT, generator=g).to(dtype)
    got = y.clone()
    kernel = native.BoundQBgmv.bind(pool, IN, OUT, G)
    assert kernel(x, got, index, null)
    want = _reference(pool, x, y, index, null)
    op = "reordered" if dtype is torch.float32 else "rounded"
    assert_close(got.float(), want, op, dtype, k=IN * 16, scale=float(want.abs().max()))
    untouched = (index == null) | (index == 3)
    assert torch.equal(got[untouched], y[untouched])
    for i in (0, 4, 27):  # alone (a one-token call) against grouped
        one = y[i:i + 1].clone()
        assert kernel(x[i:i + 1], one, index[i:i + 1], null)
        assert_close(got[i:i + 1].float(), one.float(), op, dtype, k=IN * 16, scale=float(want.abs().max()))


def test_every_bit_width_alone():
    for bits in QBITS:
        pool, null = _pool([((bits, 3),)], seed=bits)
        x, y = torch.randn(4, IN), torch.randn(4, OUT)
        index = torch.tensor([0, null, 0, 0])  # one token, then a run of two
        got = y.clone()
        assert native.BoundQBgmv.bind(pool, IN, OUT, G)(x, got, index, null)
        assert_close(got, _reference(pool, x, y, index, null), "reordered", k=IN, msg=f"{bits} bits")


def test_embedding_lookup_matches_the_reference():
    pool, null = _pool(PLANS, seed=2)  # a table: H = IN, V = OUT
    kernel = native.BoundQBgmv.bind(pool, IN, OUT, G)
    index = torch.tensor([1, 0, null, 2, 0])
    ids = torch.tensor([5, OUT - 1, 7, 0, 63])
    y = torch.randn(5, IN)
    want = y.clone()
    for i, k in enumerate(index.tolist()):
        if k != null:
            A, B = _dense(pool, k)
            want[i] += B[:, ids[i]] @ A
    got = y.clone()
    assert kernel.embedding(ids, got, index, null)
    assert_close(got, want, "reordered", k=16)
    assert not kernel.embedding(torch.tensor([0, 1, 2, 3, OUT]), y.clone(), index, null)  # an id past the table


def test_contract_violations_fall_back():
    pool, null = _pool(PLANS)
    assert native.BoundQBgmv.bind(pool, IN, OUT, 32) is None  # group not a multiple of 64
    assert native.BoundQBgmv.bind(pool, IN + 8, OUT, G) is None  # scales disagree with in
    assert native.BoundQBgmv.bind({**pool, "ascale": pool["ascale"].double()}, IN, OUT, G) is None
    kernel = native.BoundQBgmv.bind(pool, IN, OUT, G)
    y = torch.zeros(2, OUT)
    assert not kernel(torch.randn(2, IN + 1), y, torch.tensor([0, 1]), null)  # x of the wrong width
    assert not kernel(torch.randn(2, IN).bfloat16(), y, torch.tensor([0, 1]), null)  # dtypes differ
    assert torch.equal(y, torch.zeros(2, OUT))


def test_quantized_form_equals_the_expanded_factors():
    kind, g = QLowRankKind(), torch.Generator().manual_seed(3)
    cfg = QLowRankConfig(targets=("q_proj",), bands=((f"{OUT}x{IN}", PLANS[0]),), group_size=G, u_groups="out")
    params = kind.init_params(cfg, OUT, IN, identity=False, generator=g)
    A, B = dense_rows(kind.quantized_form(cfg, params).tensors, IN, OUT, G)
    U, S, Vt = qlowrank_factors(cfg, params, OUT, IN)
    assert_close(A, Vt * S[:, None], "rounded")  # S folded into the group scales: one fp32 rounding
    assert_close(B, U.t(), "exact")
    rank_grouped = QLowRankConfig(targets=("q_proj",), bands=cfg.bands, group_size=G, u_groups="rank")
    assert kind.quantized_form(rank_grouped, kind.init_params(rank_grouped, OUT, IN, identity=False,
                                                              generator=g)) is None
    five = QLowRankConfig(targets=("q_proj",), bands=((f"{OUT}x{IN}", ((5, 2),)),), group_size=G, u_groups="out")
    assert kind.quantized_form(five, kind.init_params(five, OUT, IN, identity=False, generator=g)) is None


def test_portable_build_matches_the_native_one(tmp_path):
    """The plain-loop build (no AVX2/FMA/F16C) computes what this machine's build computes."""
    lib = build_with("qlora_cpu", tmp_path)
    lib.qlora_path.restype = ctypes.c_int
    assert lib.qlora_path() == 0
    fn = lib.qlora_bgmv
    fn.argtypes = native._QLORA_ARGS["qlora_bgmv"]
    pool, null = _pool(PLANS, seed=4)
    index = torch.tensor([2, 0, null, 1, 1, 1])
    x, y = torch.randn(6, IN), torch.randn(6, OUT)
    got, want = y.clone(), y.clone()
    t = pool
    fn(6, IN, OUT, t["bits"].shape[1], G, x.data_ptr(), IN, got.data_ptr(), OUT, 0, t["bits"].data_ptr(),
       t["aoff"].data_ptr(), t["boff"].data_ptr(), t["data"].data_ptr(), t["data"].stride(0), t["ascale"].data_ptr(),
       t["abias"].data_ptr(), t["bscale"].data_ptr(), t["bbias"].data_ptr(), index.data_ptr(), null)
    assert native.BoundQBgmv.bind(pool, IN, OUT, G)(x, want, index, null)
    assert_close(got, want, "reordered", k=IN * 16, scale=float(want.abs().max()))


AVX2_ONLY = ("-march=haswell",)  # AVX2, FMA, F16C; no AVX-512: the fp32 row loops for every dtype


def _call(fn, pool, x, y, index, null, in_f, out_f, group):
    t = pool
    fn(len(index), in_f, out_f, t["bits"].shape[1], group, x.data_ptr(), in_f, y.data_ptr(), out_f,
       int(y.dtype is torch.bfloat16), t["bits"].data_ptr(), t["aoff"].data_ptr(), t["boff"].data_ptr(),
       t["data"].data_ptr(), t["data"].stride(0), t["ascale"].data_ptr(), t["abias"].data_ptr(),
       t["bscale"].data_ptr(), t["bbias"].data_ptr(), index.data_ptr(), null)


def test_bf16_dot_product_path_is_taken_where_the_cpu_has_it():
    from deltafleet.dtypes import cpu_flags
    has = {"avx512_bf16", "avx512vl", "avx512bw", "avx2", "fma", "f16c"} <= cpu_flags()
    assert (native.qlora_path() == "avx512_bf16") == has


# (in, out, group, plan): the serving shapes of SmolLM2 at 1/64 (2-bit bands, group 128, an in of 576 = 4.5 groups),
# odd and single-row bands, 4 bits, and 2/4-bit bands beside the fp32 rows' widths in one slot
FAST_CASES = [(576, 1536, 128, ((2, 47),)), (1536, 576, 128, ((2, 47),)), (192, 320, 64, ((2, 1),)),
              (320, 192, 64, ((4, 7),)), (192, 320, 64, ((4, 3), (2, 6))), (192, 320, 64, ((8, 2), (4, 3), (2, 5))),
              (256, 448, 128, ((16, 1), (3, 2), (2, 3)))]


def _bf16_matches_reference(pool, null, empty, index, in_f, out_f, group, seed):
    """The bound kernel on bf16 x, y (y small: the bound is on the delta's scale) against the fp32 reference; rows
    of the null row and the empty slot untouched. Returns x, y, the reference, the kernel's answer and the scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(index), in_f, generator=g).bfloat16()
    y = (torch.randn(len(index), out_f, generator=g) * 1e-3).bfloat16()
    want = _reference(pool, x, y, index, null, group)
    got = y.clone()
    assert native.BoundQBgmv.bind(pool, in_f, out_f, group)(x, got, index, null)
    untouched = (index == null) | (index == empty)
    assert torch.equal(got[untouched], y[untouched])
    scale = float(want.abs().max())
    assert_close(got.float(), want, "rounded", torch.bfloat16, scale=scale)
    return x, y, want, got, scale


@pytest.mark.parametrize("in_f,out_f,group,plan", FAST_CASES)
def test_bf16_activations_match_the_reference_and_the_avx2_rows(in_f, out_f, group, plan, tmp_path):
    """bf16 activations (the AVX512-BF16 rows where the CPU has them): distinct slots, a slot's scattered tokens (run
    one by one when every row is 2 or 4 bits) and the null row, against the fp32 reference and against the AVX2-only
    build of the same source."""
    pool, null = _pool([plan, plan, plan], in_f=in_f, out_f=out_f, group=group, seed=in_f + len(plan))
    index = torch.tensor([0, 1, null, 2, 0, 0, 3, 1, 0, 2, 0])
    x, y, want, got, scale = _bf16_matches_reference(pool, null, 3, index, in_f, out_f, group, seed=11)
    lib = build_with("qlora_cpu", tmp_path, AVX2_ONLY)
    lib.qlora_path.restype = ctypes.c_int
    assert lib.qlora_path() == 2
    fn = lib.qlora_bgmv
    fn.argtypes = native._QLORA_ARGS["qlora_bgmv"]
    avx2 = y.clone()
    _call(fn, pool, x, avx2, index, null, in_f, out_f, group)
    assert_close(avx2.float(), want, "rounded", torch.bfloat16, scale=scale)
    assert_close(got.float(), avx2.float(), "rounded", torch.bfloat16, scale=scale)
    xf, yf = x.float(), y.float()  # fp32 activations: the AVX2 rows in both builds
    native32, avx32 = yf.clone(), yf.clone()
    assert native.BoundQBgmv.bind(pool, in_f, out_f, group)(xf, native32, index, null)
    _call(fn, pool, xf, avx32, index, null, in_f, out_f, group)
    assert_close(native32, _reference(pool, xf, yf, index, null, group), "reordered", k=in_f * 16, scale=scale)
    assert_close(native32, avx32, "reordered", k=in_f * 16, scale=scale)


def test_bf16_embedding_lookup_of_a_two_bit_table():
    """The table's lookup adds B's coefficients times A's rows: 2-bit rows on the bf16 path."""
    H, V = 576, 1024
    pool, null = _pool([((2, 9),), ((2, 4),)], in_f=H, out_f=V, group=128, seed=13)
    index = torch.tensor([1, 0, null, 0, 1])
    ids = torch.tensor([5, V - 1, 7, 0, 129])
    y = torch.randn(5, H).bfloat16()
    want = y.float().clone()
    for i, k in enumerate(index.tolist()):
        if k != null:
            A, B = _dense(pool, k, H, V, 128)
            want[i] += B[:, ids[i]] @ A
    got = y.clone()
    assert native.BoundQBgmv.bind(pool, H, V, 128).embedding(ids, got, index, null)
    assert_close(got.float(), want, "rounded", torch.bfloat16)
    assert torch.equal(got[2], y[2])


@st.composite
def _bf16_cases(draw):
    """Shapes (in, out multiples of 64; a group size that need not divide them), a slot's bands (2/4-bit among
    the other widths, 1-9 rows each, highest bits first) and a batch's slot ids (repeats, the null row, the empty
    slot)."""
    group = draw(st.sampled_from([64, 128, 192]))
    in_f, out_f = 64 * draw(st.integers(1, 6)), 64 * draw(st.integers(1, 6))
    pool_widths = [4, 2] if draw(st.booleans()) else [16, 8, 4, 3, 2]  # half: only the bf16 path's widths
    widths = sorted(draw(st.sets(st.sampled_from(pool_widths), min_size=1, max_size=3)), reverse=True)
    if not {2, 4} & set(widths):
        widths.append(draw(st.sampled_from([4, 2])))
    plan = tuple((b, draw(st.integers(1, 9))) for b in sorted(widths, reverse=True))
    index = draw(st.lists(st.integers(0, 3), min_size=1, max_size=12))  # slot 2: the empty one; 3: null
    return in_f, out_f, group, plan, index


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_bf16_cases())
def test_bf16_rows_match_the_reference_on_random_shapes_and_plans(case):
    """The AVX512-BF16 rows (where the CPU has them; the AVX2 rows elsewhere) against the fp32 reference, over
    random shapes, group sizes (a last group cut short), band plans (odd and single-row bands beside 3/8/16-bit
    ones) and slot patterns."""
    in_f, out_f, group, plan, slots = case
    pool, null = _pool([plan, plan[::-1][:1]], in_f=in_f, out_f=out_f, group=group, seed=in_f * out_f + group)
    assert null == 3
    _bf16_matches_reference(pool, null, 2, torch.tensor(slots), in_f, out_f, group, seed=len(slots))
