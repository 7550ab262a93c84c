"""PaFi's kind: the magnitude mask, the sparse math against dense references, the shared-mask cache, the tenant
format (round trip and hostile files) and the sparse slot pool."""

from __future__ import annotations

import json

import pytest
import torch

from deltafleet.adapters import load_adapter, random_adapter, save_adapter
from deltafleet.adapters.adapter import merge_adapter
from deltafleet.adapters.pafi import PafiConfig, magnitude_mask, mask_nnz, sparse_apply
from deltafleet.adapters.pafi.functional import csr_rows, sparse_apply_batched
from deltafleet.adapters.pafi.mask import build_mask, load_mask, mask_dir, mask_id, save_mask
from deltafleet.adapters.serving import to_serving_form
from deltafleet.adapters.sparse.functional import sparse_dense
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_model
from deltafleet.serve.engine.backends import CpuBackend, ReferenceBackend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import PoolSpec, SparsePool
from deltafleet.store.safetensors_io import load_tensors, save_tensors
from tests.conftest import assert_close

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFLEET_CACHE_DIR", str(tmp_path / "cache"))


def test_magnitude_mask_selects_the_smallest_entries_as_valid_csr():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    w[3, :] = 0.0  # ties: broken by position
    cols, row_ptr = magnitude_mask(w, 0.1)
    nnz = mask_nnz(0.1, 48, 40)
    assert cols.dtype == row_ptr.dtype == torch.int32 and cols.numel() == nnz == 192
    assert row_ptr[0] == 0 and row_ptr[-1] == nnz and bool((row_ptr[1:] >= row_ptr[:-1]).all())
    rows = csr_rows(row_ptr)
    chosen = torch.zeros_like(w, dtype=torch.bool)
    chosen[rows, cols.long()] = True
    assert int(chosen.sum()) == nnz  # no duplicates
    assert w.abs()[chosen].max() <= w.abs()[~chosen].min()
    assert bool(chosen[3].all())  # the zero row is the smallest
    for r in range(48):  # columns ascend within a row
        c = cols[row_ptr[r]:row_ptr[r + 1]]
        assert bool((c[1:] > c[:-1]).all())
    again = magnitude_mask(w.clone(), 0.1)
    assert torch.equal(again[0], cols) and torch.equal(again[1], row_ptr)
    assert mask_nnz(1e-9, 4, 4) == 1 and mask_nnz(1.0, 4, 4) == 16


@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_sparse_apply_equals_the_dense_delta(density):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 56, generator=g)
    cols, row_ptr = magnitude_mask(w, density)
    values = torch.randn(cols.numel(), generator=g)
    x = torch.randn(3, 5, 56, generator=g)
    dense = sparse_dense(values, cols, row_ptr, 24, 56)
    assert_close(sparse_apply(x, values, cols, row_ptr), x @ dense.t(), "reordered", k=56)
    slots = torch.randn(4, cols.numel(), generator=g)
    index = torch.tensor([2, 0, 3, 3, 1])
    xb = x[0]
    want = torch.stack([xb[i] @ sparse_dense(slots[k], cols, row_ptr, 24, 56).t() for i, k in enumerate(index)])
    assert_close(sparse_apply_batched(xb, slots, cols, row_ptr, index), want, "reordered", k=56)


def test_merge_equals_apply_on_a_tiny_model(tiny_llama):
    model, _ = load_model(tiny_llama)
    cfg = model.config
    adapter = random_adapter(cfg, PafiConfig(density=0.05, targets=ALL), seed=3)
    adapter = type(adapter)(adapter.config, {k: {n: t * 10 if t.is_floating_point() else t for n, t in p.items()}
                                             for k, p in adapter.params.items()})
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
        hooked = model(ids, hook=adapter.hook())
        merge_adapter(model, adapter)
        merged = model(ids)
    assert (hooked - base).abs().max() > 1e-2  # the tenant changes the output
    assert_close(merged, hooked, "reordered", k=cfg.intermediate_size, depth=cfg.num_layers + 1)


def _tenant(tiny_llama, tmp_path, density=0.05, seed=0):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    adapter = random_adapter(cfg, PafiConfig(density=density, targets=ALL), seed=seed)
    return cfg, adapter, save_adapter(adapter, tmp_path / f"t{seed}", model_cfg=cfg, base_fingerprint="sha256:x")


def test_tenant_round_trip_stores_values_only_and_shares_the_mask(tiny_llama, tmp_path):
    cfg, adapter, d = _tenant(tiny_llama, tmp_path)
    _, _, d2 = _tenant(tiny_llama, tmp_path, seed=1)
    manifest = json.loads((d / "deltafleet.json").read_text())
    assert manifest["format"] == "deltafleet-pafi" and manifest["kind"] == "pafi"
    stored = load_tensors(d / "adapter_model.safetensors")
    assert all(n.endswith(".values") and t.dtype == torch.float16 for n, t in stored.items())
    nnz = sum(p["values"].numel() for p in adapter.params.values())
    assert manifest["bytes"] == 2 * nnz and manifest["num_params"] == nnz
    a, b = load_adapter(d, cfg), load_adapter(d2, cfg)
    assert a.config.mask == b.config.mask == manifest["config"]["mask"]
    for key, p in adapter.params.items():
        assert torch.equal(a.params[key]["values"], p["values"].half())
        assert a.params[key]["cols"] is b.params[key]["cols"]  # one interned mask
        assert torch.equal(a.params[key]["cols"], p["cols"])
    assert a.nbytes == 2 * nnz  # the tenant's own bytes: fp16 values, not the shared mask
    form = to_serving_form(a, torch.float32)
    assert form.family == "sparse" and form.width == 50_000
    assert form.nbytes == 4 * nnz  # the shared indices are not a tenant's bytes


def test_mask_cache_refuses_altered_or_missing_masks(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(0)
    mask = build_mask({(0, "q_proj"): torch.randn(8, 8, generator=g)}, 0.25)
    root = tmp_path / "masks"
    mid = save_mask(mask, 0.25, None, root)
    assert mid == mask_id(mask, 0.25)
    with pytest.raises(ArtifactError, match="not found"):
        load_mask("sha256:0123456789abcdef", root)
    other = build_mask({(0, "q_proj"): torch.randn(8, 8, generator=g)}, 0.25)
    oid = mask_id(other, 0.25)
    d = mask_dir(oid, root)
    d.mkdir(parents=True)
    (d / "deltafleet.json").write_text((mask_dir(mid, root) / "deltafleet.json").read_text())
    save_tensors({"layers.0.q_proj.cols": mask[(0, "q_proj")][0], "layers.0.q_proj.row_ptr": mask[(0, "q_proj")][1]},
                 d / "mask.safetensors")  # another mask's contents under this id
    with pytest.raises(ArtifactError, match="do not match"):
        load_mask(oid, root)


@pytest.mark.parametrize("damage", ["short", "extra", "missing", "nan", "int", "no-mask", "bad-density"])
def test_hostile_tenants_are_refused_naming_the_file(tiny_llama, tmp_path, damage):
    cfg, adapter, d = _tenant(tiny_llama, tmp_path)
    weights = d / "adapter_model.safetensors"
    tensors = load_tensors(weights)
    first = sorted(tensors)[0]
    manifest_path = d / "deltafleet.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "short":
        tensors[first] = tensors[first][:-1]
    elif damage == "extra":
        tensors["layers.0.q_proj.cols"] = torch.zeros(3, dtype=torch.float16)
    elif damage == "missing":
        tensors.pop(first)
    elif damage == "nan":
        tensors[first][0] = float("nan")
    elif damage == "int":
        tensors[first] = tensors[first].to(torch.int16)
    elif damage == "no-mask":
        manifest["config"]["mask"] = ""
    else:
        manifest["config"]["density"] = 1.5
    save_tensors(tensors, weights)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as e:
        load_adapter(d, cfg)
    assert str(d) in str(e.value)


def test_sparse_pool_refuses_another_mask_and_backends_agree(tiny_llama, tmp_path):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    pool = SparsePool(PoolSpec("pafi", "sparse", 3, 50_000), cfg, torch.float32)
    forms = [to_serving_form(random_adapter(cfg, PafiConfig(density=0.05, targets=ALL), seed=s), torch.float32)
             for s in range(3)]
    for slot, form in enumerate(forms):
        pool.write(slot, form)
    assert pool.nbytes == sum(f.nbytes for f in forms) * 4 // 3  # 3 slots and the null row
    odd = random_adapter(cfg, PafiConfig(density=0.05, targets=ALL), seed=9)
    key = (0, "q_proj")
    odd.params[key]["cols"] = odd.params[key]["cols"].flip(0).contiguous()
    with pytest.raises(ValueError, match="mask differs"):
        pool.write(0, to_serving_form(odd, torch.float32))
    assert torch.equal(pool.tensors[key]["values"][0], forms[0].modules[key]["values"])  # nothing overwritten
    layout = BatchLayout.build([(pool, 2), (None, -1), (pool, 0), (pool, 2)], tokens_per_row=2)
    step = layout.pool_steps[0]
    out_f, in_f = cfg.linear_shape("q_proj")
    x = torch.randn(8, in_f, generator=torch.Generator().manual_seed(0))
    y = torch.randn(8, out_f, generator=torch.Generator().manual_seed(1))
    tensors = pool.tensors[key]
    want = ReferenceBackend().apply_sparse(x, y.clone(), tensors, step)
    assert (want - y)[2:4].abs().max() == 0 and (want - y).abs().max() > 0  # the base row is untouched
    for backend in (CpuBackend(native=True), CpuBackend(native=False)):
        assert_close(backend.apply_sparse(x, y.clone(), tensors, step), want, "reordered", k=in_f)


def test_a_tenant_naming_another_bases_mask_is_refused(tiny_llama, tmp_path):
    """A tenant's manifest may name any cached mask: one recorded for another base is refused at load."""
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    other = random_adapter(cfg, PafiConfig(density=0.05, targets=ALL), seed=1)
    for p in other.params.values():
        p["cols"] = p["cols"].flip(0).contiguous()
    foreign = save_adapter(other, tmp_path / "foreign", model_cfg=cfg, base_fingerprint="sha256:other")
    _, _, d = _tenant(tiny_llama, tmp_path)  # base "sha256:x"
    manifest = json.loads((d / "deltafleet.json").read_text())
    manifest["config"]["mask"] = json.loads((foreign / "deltafleet.json").read_text())["config"]["mask"]
    (d / "deltafleet.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="made for base sha256:other, but the tenant is for sha256:x"):
        load_adapter(d, cfg)
