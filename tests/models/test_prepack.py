"""`PrepackedLinear` (oneDNN over a reordered weight) equals F.linear: any row count and leading shape, with bias;
on whole tiny models (tied LM head included) swapped logits equal unswapped ones and transformers', state_dict keys
and tied weights survive the swap and the swap back; a weight changed after packing is honoured (repacked);
bf16 models pack too; gradients, fp16 modules and `nn.Linear` subclasses take F.linear or are left alone; the model
file stays free of CPU-specific code."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from deltafleet.adapters import LoraConfig, merge_adapter, random_adapter
from deltafleet.models import llama, prepack
from deltafleet.models.loading import load_model
from deltafleet.models.prepack import PrepackedLinear
from deltafleet.serve.engine import Engine, EngineConfig
from tests.conftest import TINY_CONFIGS, assert_close, forward_chain, token_batch

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(40, 72, bias=bias).requires_grad_(False)


def _model(path, dtype=torch.float32) -> llama.Transformer:
    model, _ = load_model(path, dtype=dtype)
    return model.requires_grad_(False)


def _inputs(vocab: int) -> dict:
    """A batch of 3 with left padding of different lengths (odd sizes, real masks)."""
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return dict(input_ids=token_batch(vocab, 3, 7, seed=5), attention_mask=mask)


def _linears(model: llama.Transformer) -> list[nn.Module]:
    return [model.linear(i, p) for i in range(model.config.num_layers) for p in PROJECTIONS] + [model.lm_head]


def test_model_file_has_no_cpu_specific_code():
    source = inspect.getsource(llama)
    assert "prepack" not in source and "mkldnn" not in source


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (33, 40), (2, 5, 40)])
def test_prepacked_linear_matches_f_linear(bias, shape):
    lin = _linear(bias)
    packed = PrepackedLinear(lin, batch_hint=8)
    assert packed.weight is lin.weight and packed.bias is lin.bias
    assert packed.packed_nbytes == 40 * 72 * 4
    for x in (torch.randn(*shape), torch.randn(*shape[:-2], shape[-1], shape[-2]).mT):  # contiguous, then a view
        assert_close(packed(x), F.linear(x, lin.weight, lin.bias), "reordered", k=40)


def test_weight_changed_after_packing_is_repacked():
    lin = _linear(bias=True)
    packed = PrepackedLinear(lin, batch_hint=8)
    x = torch.randn(4, 40)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: the version counter moves
        lin.bias.add_(1.0)  # the bias is read live on every call
    assert_close(packed(x), F.linear(x, lin.weight, lin.bias), "reordered", k=40)
    packed.weight.data = torch.randn(72, 40)  # storage replaced (as merge_adapter does): the data pointer moves
    assert_close(packed(x), F.linear(x, packed.weight, lin.bias), "reordered", k=40)
    packed.weight = nn.Parameter(torch.randn(72, 40), requires_grad=False)  # a new Parameter
    assert_close(packed(x), F.linear(x, packed.weight, lin.bias), "reordered", k=40)
    assert packed.packed_nbytes == 40 * 72 * 4  # repacked, not dropped: the fast path stays


def test_gradients_take_f_linear():
    lin = _linear(bias=True).requires_grad_(True)
    packed = PrepackedLinear(lin)
    x = torch.randn(3, 40, requires_grad=True)
    y = packed(x)
    y.square().sum().backward()  # the packed op has no backward: this only works because F.linear ran
    ref_x = x.detach().requires_grad_(True)
    F.linear(ref_x, lin.weight.detach(), lin.bias.detach()).square().sum().backward()
    assert_close(x.grad, ref_x.grad, "exact")  # F.linear both times
    assert lin.weight.grad is not None and lin.bias.grad is not None
    with torch.no_grad():  # the same module, no gradient needed: the packed path, still equal
        assert_close(packed(x), F.linear(x, lin.weight, lin.bias), "reordered", k=40)


def test_other_dtypes_are_left_alone():
    lin = _linear(bias=False)
    packed = PrepackedLinear(lin)
    packed.to(torch.float16)  # converted after packing: F.linear, and the stale fp32 copy is freed
    x = torch.randn(5, 40, dtype=torch.float16)
    assert_close(packed(x), F.linear(x, lin.weight.half()), "exact")  # F.linear both times
    assert packed.packed_nbytes == 0
    assert PrepackedLinear(nn.Linear(8, 8).half()).packed_nbytes == 0


@pytest.mark.skipif(not prepack._bf16_supported(), reason="oneDNN computes no bf16 on this CPU")
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_packed_equals_f_linear(bias):
    """A bf16 model packs too (oneDNN bf16: avx512_bf16 / AMX, or emulated on AVX-512); converting an fp32 pack to
    bf16 repacks in bf16 on the next call."""
    lin = _linear(bias=bias)
    packed = PrepackedLinear(lin)
    packed.to(torch.bfloat16)
    x = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    want = F.linear(x, lin.weight.bfloat16(), None if lin.bias is None else lin.bias.bfloat16())
    assert_close(packed(x), want, "rounded", torch.bfloat16)
    assert packed.packed_nbytes > 0


def test_only_exact_nn_linear_is_swapped():
    class Subclass(nn.Linear):  # stands for any other linear-like module (QuantLinear, peft layers)
        pass

    shared = nn.Linear(8, 8)
    model = nn.ModuleDict(dict(a=nn.Sequential(shared, Subclass(8, 8)), b=nn.Sequential(shared),
                               c=nn.Linear(8, 8).half()))
    assert prepack.pack_linears_(model) == 8 * 8 * 4  # the shared module once
    assert type(model["a"][0]) is PrepackedLinear and model["a"][0] is model["b"][0]
    assert type(model["a"][1]) is Subclass and type(model["c"]) is nn.Linear
    assert prepack.pack_linears_(model) == 0  # idempotent
    with pytest.raises(ValueError, match="bare nn.Linear"):
        prepack.pack_linears_(nn.Linear(8, 8))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_swapped_model_matches_unswapped_and_transformers(tiny_checkpoints, name):
    ref, ours = _model(tiny_checkpoints[name]), _model(tiny_checkpoints[name])
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints[name]), dtype=torch.float32).eval()
    state = ours.state_dict()
    weight_bytes = sum(m.weight.numel() * 4 for m in _linears(ours))
    assert prepack.pack_linears_(ours, batch_hint=8) == weight_bytes
    assert all(type(m) is PrepackedLinear for m in _linears(ours))  # the seven projections and the LM head
    assert prepack.packed_bytes(ours) == weight_bytes
    after = ours.state_dict()
    assert list(after) == list(state)  # same keys, same tensors: nothing new is saved
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    inputs = _inputs(ours.config.vocab_size)
    with torch.no_grad():
        expected = ref(**inputs)
        assert not torch.equal(expected, torch.zeros_like(expected))
        chain = forward_chain(ours.config)
        assert_close(ours(**inputs), expected, "reordered", **chain)  # oneDNN's blocking against MKL's
        ids = inputs["input_ids"]  # unpadded: transformers places padded tokens at other positions
        assert_close(ours(ids), theirs(ids).logits, "reordered", **chain)
    weights = [m.weight for m in _linears(ours)]
    prepack.unpack_linears_(ours)
    assert all(type(m) is nn.Linear for m in _linears(ours)) and prepack.packed_bytes(ours) == 0
    assert all(m.weight is w for m, w in zip(_linears(ours), weights, strict=True))
    assert list(ours.state_dict()) == list(state)
    if ours.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():  # plain nn.Linear again, over the same weights as ref: the same arithmetic
        assert_close(ours(**inputs), expected, "exact")


@pytest.mark.parametrize("name", ["llama", "llama3-rope-tied"])
def test_merge_after_packing_is_honoured(tiny_checkpoints, name):
    ref, ours = _model(tiny_checkpoints[name]), _model(tiny_checkpoints[name])
    prepack.pack_linears_(ours)
    adapter = random_adapter(ours.config, LoraConfig(r=4), seed=3)  # non-identity: the merge moves the logits
    inputs = _inputs(ours.config.vocab_size)
    with torch.no_grad():
        base = ours(**inputs)
        merge_adapter(ref, adapter)
        merge_adapter(ours, adapter)  # replaces the weights' storage under the packed modules
        expected = ref(**inputs)
        assert not torch.allclose(expected, base, atol=1e-2)
        assert_close(ours(**inputs), expected, "reordered", **forward_chain(ours.config))
    assert prepack.packed_bytes(ours) > 0  # repacked on the first call after the merge


@pytest.mark.skipif(not prepack._bf16_supported(), reason="oneDNN computes no bf16 on this CPU")
def test_bf16_model_packs_and_keeps_its_logits(tiny_llama):
    model, ref = _model(tiny_llama, dtype=torch.bfloat16), _model(tiny_llama, dtype=torch.bfloat16)
    assert prepack.pack_linears_(model) > 0
    assert all(type(m) is PrepackedLinear for m in _linears(model))
    batch = _inputs(model.config.vocab_size)
    assert_close(model(**batch), ref(**batch), "rounded", torch.bfloat16, depth=forward_chain(model.config)["depth"])


def test_half_model_is_left_alone(tiny_llama):
    model = _model(tiny_llama, dtype=torch.float16)
    assert prepack.pack_linears_(model) == 0
    assert all(type(m) is nn.Linear for m in _linears(model))


@pytest.mark.parametrize("enabled", [True, False])
def test_engine_swaps_at_start_up(tiny_llama, enabled):
    model = _model(tiny_llama)
    engine = Engine(model, None, EngineConfig(dtype="float32", max_batch=4, max_model_len=32, prepack=enabled))
    assert all(type(m) is (PrepackedLinear if enabled else nn.Linear) for m in _linears(engine.model))
    assert (prepack.packed_bytes(engine.model) > 0) == enabled
