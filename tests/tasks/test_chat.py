"""Chat-template encoding with SmolLM2's tokenizer (ChatML): prompt = user turn + assistant header; answer =
the answer's tokens + <|im_end|>."""

from __future__ import annotations

import copy

import pytest

from deltafleet.errors import DeltafleetError
from deltafleet.tasks import TASKS, Example, encode_example, prompt_ids


@pytest.mark.parametrize("name", ["addition", "json-field", "shakespeare"])
def test_encode_example_splits_template_at_the_assistant_turn(smollm2_tokenizer, name):
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for ex in TASKS[name].examples("val", n=3):
        enc = encode_example(tok, ex)
        assert list(enc.prompt_ids) == prompt_ids(tok, ex.prompt)
        assert tok.decode(enc.prompt_ids).endswith(f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n")
        assert enc.answer_ids[-1] == im_end and im_end not in enc.answer_ids[:-1]
        assert tok.decode(enc.answer_ids) == ex.answer + "<|im_end|>"
        full = tok.apply_chat_template([{"role": "user", "content": ex.prompt},
                                        {"role": "assistant", "content": ex.answer}], tokenize=False)
        assert tok.decode(enc.prompt_ids + enc.answer_ids) + "\n" == full
        assert len(enc) == len(enc.prompt_ids) + len(enc.answer_ids)


def test_tokenizer_without_eos_is_refused(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.eos_token = None
    with pytest.raises(DeltafleetError, match="no eos_token"):
        encode_example(tok, Example(prompt="2+2?", answer="4", key="2+2?"))
