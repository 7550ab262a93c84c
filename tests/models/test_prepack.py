"""Prepacked (oneDNN) linears equal F.linear: any row count and leading shape, with bias, on a whole tiny model
(tied LM head included, against transformers); a weight changed after packing is noticed; gradients and
non-fp32 modules take F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from deltafleet.models import prepack
from deltafleet.models.loading import load_model
from tests.conftest import TINY_CONFIGS, TOL, token_batch

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")


def _packed_linear(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(40, 72, bias=bias).requires_grad_(False)
    assert prepack.pack_linears_(lin, batch_hint=8) == 40 * 72 * 4
    return lin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 40), (3, 40), (33, 40), (2, 5, 40)])
def test_packed_linear_matches_f_linear(bias, shape):
    lin = _packed_linear(bias)
    x = torch.randn(*shape)
    torch.testing.assert_close(prepack.linear(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert prepack.packed_bytes(lin) == 40 * 72 * 4


def test_weight_changed_after_packing_is_noticed():
    lin = _packed_linear(bias=False)
    x = torch.randn(4, 40)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: the version counter moves
    torch.testing.assert_close(prepack.linear(lin, x), x @ lin.weight.T)
    assert prepack.packed_bytes(lin) == 0  # the stale copy is dropped
    prepack.pack_linears_(lin)
    lin.weight = nn.Parameter(torch.randn(72, 40), requires_grad=False)  # replaced: the data pointer moves
    torch.testing.assert_close(prepack.linear(lin, x), x @ lin.weight.T)


def test_gradients_and_other_dtypes_take_f_linear():
    lin = _packed_linear(bias=True).requires_grad_(True)
    x = torch.randn(3, 40)
    y = prepack.linear(lin, x)
    y.sum().backward()  # the packed op has no backward: this only works because F.linear ran
    assert lin.weight.grad is not None
    assert prepack.pack_linears_(nn.Linear(8, 8).bfloat16()) == 0


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_packed_model_matches_transformers(tiny_checkpoints, name):
    ours, _ = load_model(tiny_checkpoints[name], dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints[name]), dtype=torch.float32).eval()
    keys = set(ours.state_dict())
    assert prepack.pack_linears_(ours) > 0
    assert set(ours.state_dict()) == keys  # nothing new is saved
    ids = token_batch(ours.config.vocab_size, 3, 7, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, **TOL[torch.float32])
    prepack.unpack_linears_(ours)
    assert prepack.packed_bytes(ours) == 0
