"""Invariants every registered adapter kind must satisfy, on a tiny model with non-trivial inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import deltafleet.compress  # noqa: F401  (registers the compressed-delta kinds)
from deltafleet.adapters import (
    KINDS,
    AdapterConfig,
    get_kind,
    load_adapter,
    merge_adapter,
    random_adapter,
    save_adapter,
    unmerge_adapter,
)
from deltafleet.models.loading import load_model
from tests.conftest import assert_close, forward_chain, token_batch

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# One non-default config per kind; a kind added to the registry without an entry here fails the test below.
CONFIGS: dict[str, AdapterConfig] = {
    "lora": KINDS["lora"].config_cls(r=5, alpha=7.0, targets=ALL),
    "road": KINDS["road"].config_cls(variant="road_4", group_size=32, targets=ALL),
    "lowrank": KINDS["lowrank"].config_cls(rank=6, targets=ALL),
    "qlowrank": KINDS["qlowrank"].config_cls(targets=ALL, group_size=32, bands=(
        ("128x128", ((8, 2), (3, 4), (2, 6))), ("64x128", ((8, 2), (2, 4))), ("256x128", ((8, 2), (3, 4), (2, 6))),
        ("128x256", ((4, 3), (2, 5))))),
    "bitdelta": KINDS["bitdelta"].config_cls(targets=ALL),
    "sparse": KINDS["sparse"].config_cls(targets=ALL, nnz=(("128x128", 300), ("64x128", 120), ("256x128", 600),
                                                           ("128x256", 600))),
    "pafi": KINDS["pafi"].config_cls(density=0.05, targets=ALL),
    "hiwi": KINDS["hiwi"].config_cls(),  # targets: the two RMSNorms of each layer
}
# Kinds whose format stores floating-point values as fp16 (PaFi values, HiWi gain changes): an fp32 adapter loads
# back rounded to fp16.
STORED_FP16 = ("pafi", "hiwi")


def test_every_registered_kind_is_covered():
    assert set(CONFIGS) == set(KINDS)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(tiny_checkpoints["qwen2-bias"])[0]  # has biases: exercises RoAd's bias merge


@pytest.fixture
def ids(model):
    return token_batch(model.config.vocab_size, 3, 13, seed=11)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_identity_init_equals_base(model, ids, kind):
    adapter = random_adapter(model.config, CONFIGS[kind], identity=True)
    with torch.no_grad():
        # the hook adds exact zeros (or scales by exactly 1) to the same base outputs
        assert_close(model(ids, hook=adapter.hook()), model(ids), "exact")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_nonidentity_differs_from_base(model, ids, kind):
    adapter = random_adapter(model.config, CONFIGS[kind], seed=1)
    with torch.no_grad():
        diff = (model(ids, hook=adapter.hook()) - model(ids)).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_merged_equals_unmerged_and_unmerge_restores(model, ids, kind):
    adapter = random_adapter(model.config, CONFIGS[kind], seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(ids, hook=adapter.hook())
        merge_adapter(model, adapter)
        merged = model(ids)
        unmerge_adapter(model, adapter)
    assert_close(merged, unmerged, "reordered", **forward_chain(model.config))
    for k, v in model.state_dict().items():  # two roundings per weight (merge, unmerge), each of <= 2 terms
        assert_close(v, before[k], "reordered", k=2, depth=2, msg=k)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_delta_weight_matches_apply(model, kind):
    """apply(x, W x + b) == (W + dW) x + b' for every projection shape (b' = b except for RoAd)."""
    k = get_kind(kind)
    cfg = CONFIGS[kind]
    g = torch.Generator().manual_seed(0)
    if kind == "hiwi":
        pytest.skip("HiWi adapts norms, not projections: tests/adapters/test_hiwi.py checks hooked == merged")
    for proj in ALL:
        out_f, in_f = model.config.linear_shape(proj)
        p = k.init_params(cfg, out_f, in_f, identity=False, generator=g)
        W, x = torch.randn(out_f, in_f, generator=g), torch.randn(5, in_f, generator=g)
        want = k.apply(cfg, p, x, x @ W.t())
        assert_close(x @ (W + k.delta_weight(cfg, p, W)).t(), want, "reordered", k=in_f, depth=2, msg=proj)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_is_bit_exact(model, tmp_path, kind, dtype):
    adapter = random_adapter(model.config, CONFIGS[kind], seed=4, layers=[0]).to(dtype)
    save_adapter(adapter, tmp_path / kind, model_cfg=model.config, base_fingerprint="sha256:0123")
    loaded = load_adapter(tmp_path / kind, model.config, expected_fingerprint="sha256:0123")
    if kind == "pafi":  # saving records the shared mask's id in the config
        assert loaded.config.mask.startswith("sha256:") and not adapter.config.mask
        loaded.config = dataclasses.replace(loaded.config, mask="")
    assert loaded.config == adapter.config
    assert loaded.params.keys() == adapter.params.keys()
    for key, p in adapter.params.items():
        for name, t in p.items():
            if kind in STORED_FP16 and t.is_floating_point():
                t = t.half()
            assert loaded.params[key][name].dtype == t.dtype  # floats in dtype, integer codes as stored
            assert torch.equal(loaded.params[key][name], t)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bf16_adapter_close_to_fp32(tiny_checkpoints, ids, kind):
    path = tiny_checkpoints["llama"]
    m32, m16 = load_model(path)[0], load_model(path, dtype=torch.bfloat16)[0]
    adapter = random_adapter(m32.config, CONFIGS[kind], seed=5)
    with torch.no_grad():
        a = m32(ids, hook=adapter.hook())
        b = m16(ids, hook=adapter.to(torch.bfloat16).hook()).float()
    assert_close(b, a, "rounded", torch.bfloat16, **forward_chain(m32.config))


def test_road_matrix_and_closed_form_inverse():
    """R from the element-wise form equals the block matrix; the closed-form inverse is R^-1."""
    from deltafleet.adapters.road.functional import road_cols, road_inverse_cols, road_left_multiply, road_matrix

    g = torch.Generator().manual_seed(0)
    for variant, n in (("road_1", 16), ("road_2", 32), ("road_4", 64)):
        theta, alpha = torch.randn(n, generator=g), 1 + 0.3 * torch.randn(n, generator=g)
        R = road_matrix(variant, 8, theta, alpha)
        c, s = road_cols(variant, 8, theta, alpha)
        for j in range(32):  # R[j, j] = c_j, R[j, partner] = -s_j (first half) or +s_j (second half)
            partner = j + 4 if j % 8 < 4 else j - 4
            assert R[j, j] == c[j]
            assert R[j, partner] == (-s[j] if j % 8 < 4 else s[j])
            assert torch.count_nonzero(R[j]) <= 2
        R_inv = road_left_multiply(torch.eye(32), *road_inverse_cols(c, s, 8), 8)
        # 2 nonzero terms a row, R^-1 rounded first; the terms (up to 30: alpha = 1 + 0.3 N(0, 1) makes some
        # blocks nearly singular) are the scale, not the identity's 1
        terms = float((R_inv.abs() @ R.abs()).max())
        assert_close(R_inv @ R, torch.eye(32), "reordered", k=2, depth=2, scale=terms)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(["road_1", "road_2", "road_4"]), half=st.integers(1, 8), groups=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_road_merge_unmerge_roundtrip_any_group_size(variant, half, groups, seed):
    """For any even group size and out size, merge then unmerge restores W and b; merged W matches apply."""
    from deltafleet.adapters import RoadConfig

    kind, cfg = get_kind("road"), RoadConfig(variant=variant, group_size=2 * half)
    out_f, in_f = 2 * half * groups, 5
    g = torch.Generator().manual_seed(seed)
    p = kind.init_params(cfg, out_f, in_f, identity=False, generator=g)
    W, b, x = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g), torch.randn(3, in_f, generator=g)
    W2, b2 = kind.merge(cfg, p, W, b)
    assert_close(x @ W2.t() + b2, kind.apply(cfg, p, x, x @ W.t() + b), "reordered", k=in_f, depth=2)
    W3, b3 = kind.unmerge(cfg, p, W2, b2)
    assert_close(W3, W, "reordered", k=2, depth=2)
    assert_close(b3, b, "reordered", k=2, depth=2)
