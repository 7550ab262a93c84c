"""MEFT (train/meft.py) on tiny random Llamas: the reversible backward equals plain autograd through the same
two-stream network, the inverse reconstructs the inputs, fewer activation bytes are saved, the artifact round
trips and malformed ones are refused, and one recipe run trains and exports."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from deltafleet.errors import ArtifactError
from deltafleet.eval.core import validation_metrics
from deltafleet.store.safetensors_io import load_tensors, read_metadata, save_tensors
from deltafleet.train import meft as M
from deltafleet.train import recipe
from deltafleet.train.config import TrainConfig
from tests.conftest import token_batch

VARIANTS = ("meft1", "meft2", "meft3")
H = 32


def _llama(layers: int = 3, dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=H, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1) if "norm" in n else p.normal_(0.0, 0.08)
    return model.to(dtype)


def _meft(variant: str, layers: int = 3, rev_layers: int | None = None, dtype=torch.float32):
    """A MEFT model whose adapters are far from 0 (std 0.2), so every adapter gradient is non-trivial."""
    model = _llama(layers, dtype)
    adapters = M.apply_meft(model, M.MeftConfig(variant, layers, H, 4, rev_layers))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0.0, 0.2)
    return model.train(), adapters


def _batch():
    ids = token_batch(96, 3, 11, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a right-padded row
    return ids, mask


def _adapter_grads(model, adapters, ids, mask):
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
    loss = (hidden * torch.linspace(-1.0, 1.0, H, dtype=hidden.dtype)).sum() + model.lm_head(hidden).logsumexp(-1).sum()
    # materialize_grads: the readout is x2, so in meft1/2 the last layer's stream-1 adapter is unused (zero grad)
    return torch.autograd.grad(loss, list(adapters.parameters()), allow_unused=True, materialize_grads=True)


def _set_rev_layers(adapters, k: int) -> None:
    object.__setattr__(adapters.config, "rev_layers", k)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rev_layers", [3, 2])
def test_reversible_grads_equal_plain_autograd_fp64(variant, rev_layers):
    """The math, free of rounding: fp64, where the inverse's 10x (meft3: 100x) per-layer error growth is harmless."""
    model, adapters = _meft(variant, dtype=torch.float64, rev_layers=rev_layers)
    ids, mask = _batch()
    got = _adapter_grads(model, adapters, ids, mask)
    _set_rev_layers(adapters, 0)
    want = _adapter_grads(model, adapters, ids, mask)
    # every adapter receives a gradient but, in meft1/2, the last layer's stream-1 adapter (4 tensors): the readout
    # is stream 2
    assert sum(float(w.abs().max()) > 1e-6 for w in want) >= len(want) - (0 if variant == "meft3" else 4)
    for (name, _), g, w in zip(adapters.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_grads_equal_plain_autograd_fp32(variant):
    """fp32 with the lowest layer reversible (the rest vanilla): rtol 1e-4."""
    model, adapters = _meft(variant, rev_layers=1)
    ids, mask = _batch()
    got = _adapter_grads(model, adapters, ids, mask)
    _set_rev_layers(adapters, 0)
    want = _adapter_grads(model, adapters, ids, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_grads_under_bf16_autocast(variant):
    """The recipe's bf16 path: autocast is restored for the recomputation; grads match plain autograd under the
    same autocast up to the reconstruction error (measured: bit-identical with one reversible layer)."""
    model, adapters = _meft(variant, rev_layers=1)
    ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _adapter_grads(model, adapters, ids, mask)
        _set_rev_layers(adapters, 0)
        want = _adapter_grads(model, adapters, ids, mask)
    worst = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))
    print(f"{variant}: bf16 autocast, reversible vs plain adapter grads: max relative difference {worst:.2e}")
    assert worst < 0.1


def _context(model, ids, mask) -> tuple[torch.Tensor, M.Context]:
    emb = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    m = create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=mask, cache=None, position_ids=pos)
    return emb, M.Context(m, model.model.rotary_emb(emb, position_ids=pos), pos, None, model.config.rms_norm_eps)


def _reconstruction_error(variant: str, layers: int, bf16: bool) -> float:
    """max over streams of max|x_rec - x| / max|x| after inverting `layers` couplings from the top."""
    model, adapters = _meft(variant, layers=layers)
    ids, mask = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        emb, c = _context(model, ids, mask)
        x = (emb, emb)
        out = M.run_layers(variant, model.model.layers, adapters.layers, *x, c, reversible=False)
        for layer, block in zip(reversed(model.model.layers), reversed(adapters.layers), strict=True):
            out = M.coupling_inverse(variant, layer, block, *out, c)
    return max(float((r - e).abs().max() / e.abs().max()) for r, e in zip(out, x, strict=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_inverse_reconstructs_inputs(variant):
    """fp32: one layer to ~1e3 u (random weights, adapters of std 0.2), then growing by ~1 / (lam beta) per layer
    (10x for meft1/2, 100x for meft3; see the module docstring); bf16 autocast (F, G recomputed on inputs that round
    differently): measured and loosely bounded."""
    fp32_one, fp32_all = _reconstruction_error(variant, 1, False), _reconstruction_error(variant, 3, False)
    bf16_one, bf16_all = _reconstruction_error(variant, 1, True), _reconstruction_error(variant, 3, True)
    print(f"{variant}: reconstruction error fp32 1 layer {fp32_one:.2e}, 3 layers {fp32_all:.2e}; "
          f"bf16 1 layer {bf16_one:.2e}, 3 layers {bf16_all:.2e}")
    v = M.VARIANTS[variant]
    growth = 3 / (v.lam * v.beta)  # per layer, with room for the layer Jacobians of random weights
    assert fp32_one < 1e-4 and fp32_all < fp32_one * growth**2
    assert bf16_one < 5e-2


def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct tensors autograd saves for backward during one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    hidden.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_reversible_saves_at_most_half_the_activations(variant):
    model, adapters = _meft(variant, layers=6)
    ids = token_batch(96, 4, 32, seed=3)
    mask = torch.ones_like(ids)
    reversible = _saved_bytes(model, ids, mask)
    _set_rev_layers(adapters, 0)
    plain = _saved_bytes(model, ids, mask)
    print(f"{variant}: saved activations reversible {reversible} B, plain autograd {plain} B")
    assert 0 < reversible <= plain / 2


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_and_load_give_identical_logits(tmp_path, variant):
    model, adapters = _meft(variant)
    ids, mask = _batch()
    want = _logits(model.eval(), ids, mask)
    base = _logits(_llama().eval(), ids, mask)
    assert float((want - base).abs().max()) > 1e-2  # the tenant differs from the base
    assert M._export(model, None, tmp_path) == "deltafleet-meft"
    manifest = json.loads((tmp_path / "deltafleet.json").read_text())
    n = sum(p.numel() for p in adapters.parameters())
    assert manifest["format"] == "deltafleet-meft" and manifest["kind"] == "meft" and manifest["variant"] == variant
    assert manifest["num_params"] == n and manifest["bytes"] == 4 * n
    assert (manifest["lambda"], manifest["beta"]) == M.VARIANTS[variant][:2]
    fresh = _llama().eval()
    M.load_meft(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, ids, mask), want, rtol=0, atol=0)


def test_generation_with_kv_cache_matches_full_forward():
    model, _ = _meft("meft3")
    model.eval()
    ids = token_batch(96, 2, 6, seed=4)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    logits = _logits(model, out[:, :-1], torch.ones_like(out[:, :-1]))
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


@pytest.fixture
def exported(tmp_path):
    model, _ = _meft("meft1")
    M._export(model, None, tmp_path)
    return tmp_path / M.ADAPTER_FILE


def test_load_refuses_garbage_and_truncated_files(exported):
    data = exported.read_bytes()
    exported.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated") as e:
        M.load_meft(_llama(), exported.parent)
    assert e.value.path == str(exported)
    exported.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError) as e:
        M.load_meft(_llama(), exported.parent)
    assert e.value.path == str(exported)
    exported.unlink()
    with pytest.raises(ArtifactError, match="file not found"):
        M.load_meft(_llama(), exported.parent)


@pytest.mark.parametrize("damage", ["shape", "nan", "missing", "variant"])
def test_load_refuses_bad_tensors_and_settings(exported, damage):
    tensors, meta = load_tensors(exported), read_metadata(exported)
    if damage == "shape":
        tensors["layers.1.g.up.weight"] = torch.zeros(H, 5)
        rule = r"'layers.1.g.up.weight' has shape \(32, 5\), expected \(32, 4\)"
    elif damage == "nan":
        tensors["layers.0.f.down.bias"][2] = float("nan")
        rule = "non-finite"
    elif damage == "missing":
        del tensors["layers.2.f.up.bias"]
        rule = "missing"
    else:
        meta["variant"] = "meft9"
        rule = "variant='meft9'"
    save_tensors(tensors, exported, metadata=meta)
    with pytest.raises(ArtifactError, match=rule) as e:
        M.load_meft(_llama(), exported.parent)
    assert e.value.path == str(exported)


def test_recipe_trains_and_exports(chat_tiny, tmp_path):
    cfg = TrainConfig(base=str(chat_tiny), task="sort", method="meft", out=tmp_path / "out", steps=8, batch_size=4,
                      lr=1e-2, precision="fp32", eval_examples=4, save_every=0, meft_variant="meft1")
    result = functools.partial(recipe.train, validate=validation_metrics)(cfg, show_progress=False)
    assert result.completed and result.steps == 8
    assert sum(result.losses[-2:]) / 2 < result.losses[0], result.losses
    manifest = json.loads((tmp_path / "out" / "deltafleet.json").read_text())
    assert manifest["kind"] == "meft" and manifest["hyperparameters"]["meft_variant"] == "meft1"
    assert manifest["format"] == "deltafleet-meft" and (manifest["lambda"], manifest["beta"]) == (0.1, 1.0)
    assert manifest["trainable_params"] == result.trainable_params == 2 * 2 * (2 * 64 * 8 + 8 + 64)
    assert set(manifest["final_metrics"]) == {"val_loss", "val_accuracy"}
    loaded = M.load_meft(LlamaForCausalLM.from_pretrained(str(chat_tiny)), tmp_path / "out")
    assert loaded.config.variant == "meft1" and loaded.config.num_layers == 2
