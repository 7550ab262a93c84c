"""`perplexity` over our Transformer equals transformers' loss-based perplexity of the same windows."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltafleet.adapters import LoraConfig, merge_adapter, random_adapter
from deltafleet.errors import DeltafleetError
from deltafleet.eval.perplexity import perplexity, windows
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.loading import load_model
from tests.conftest import nll_tol

TEXT = ("Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
        "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried. ") * 3


def hf_perplexity(hf, ids: list[int], spans) -> tuple[float, int]:
    """Reference: transformers' mean loss per window with labels -100 outside the window's scored targets."""
    nll, n = 0.0, 0
    for begin, end, first in spans:
        inputs = torch.tensor([ids[begin : end + 1]])
        labels = inputs.clone()
        labels[0, : first - begin] = -100  # targets scored by an earlier window (and x_begin itself)
        k = end + 1 - first
        with torch.no_grad():
            nll += float(hf(input_ids=inputs, labels=labels).loss) * k
        n += k
    return nll, n


def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 4), (10, 4, 1), (11, 4, 3), (5, 16, 16), (2, 1, 1)]:
        targets = [t for _, end, first in windows(n, w, s) for t in range(first, end + 1)]
        assert targets == list(range(1, n)), (n, w, s)
        assert all(end - begin <= w and begin < first for begin, end, first in windows(n, w, s))


@pytest.mark.parametrize(("window", "stride", "max_windows", "batch_size"),
                         [(16, None, None, 3), (16, 5, None, 8), (32, 12, 2, 1)])
def test_equals_transformers_loss(chat_tiny, smollm2_tokenizer, window, stride, max_windows, batch_size):
    model, _ = load_model(chat_tiny)
    hf = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32).eval()
    ids = smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    got = perplexity(model, smollm2_tokenizer, TEXT, window=window, stride=stride, max_windows=max_windows,
                     batch_size=batch_size)
    spans = windows(len(ids), window, stride or window, max_windows)
    nll, n = hf_perplexity(hf, ids, spans)
    assert got["tokens"] == n and got["windows"] == len(spans) > 1
    if max_windows is None:
        assert n == len(ids) - 1
    assert got["nll"] == pytest.approx(nll, rel=nll_tol(model.config))
    assert math.log(got["ppl"]) == pytest.approx(nll / n, rel=nll_tol(model.config))


def test_hook_equals_merged_adapter(chat_tiny, smollm2_tokenizer):
    model, _ = load_model(chat_tiny)
    adapter = random_adapter(model.config, LoraConfig(r=4, alpha=8.0, targets=PROJECTIONS), seed=3)
    base = perplexity(model, smollm2_tokenizer, TEXT, window=24)
    hooked = perplexity(model, smollm2_tokenizer, TEXT, window=24, hook=adapter.hook())
    merge_adapter(model, adapter)
    merged = perplexity(model, smollm2_tokenizer, TEXT, window=24)
    assert abs(hooked["ppl"] - base["ppl"]) > 1e-3 * base["ppl"], "the adapter must change the perplexity"
    assert math.log(hooked["ppl"]) == pytest.approx(math.log(merged["ppl"]), rel=nll_tol(model.config))


def test_bad_arguments(chat_tiny, smollm2_tokenizer):
    model, _ = load_model(chat_tiny)
    with pytest.raises(DeltafleetError, match="stride=9: must be in"):
        perplexity(model, smollm2_tokenizer, TEXT, window=8, stride=9)
    with pytest.raises(DeltafleetError, match="perplexity needs at least 2"):
        perplexity(model, smollm2_tokenizer, "", window=8)
