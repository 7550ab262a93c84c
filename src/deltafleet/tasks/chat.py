"""Turn an example into token ids with the tokenizer's chat template.

    prompt_ids = template([user: prompt], add_generation_prompt=True)
    full_ids   = template([user: prompt, assistant: answer])
    answer_ids = full_ids[len(prompt_ids):], cut just after the end-of-turn token

The end-of-turn token is the tokenizer's `eos_token` (`<|im_end|>` for SmolLM2's ChatML); what the template
adds after it (a newline) is not part of the answer. A template whose full conversation does not start with
the generation prompt, or whose answer lacks the end-of-turn token, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltafleet.errors import DeltafleetError
from deltafleet.tasks.base import Example


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example; training puts the loss on `answer_ids` only."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def end_of_turn_id(tokenizer) -> int:
    eot = tokenizer.eos_token_id
    if eot is None:
        raise DeltafleetError("tokenizer has no eos_token: cannot tell where an assistant turn ends")
    return int(eot)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-templated user turn followed by the assistant header, ready for generation."""
    return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True))


def encode_example(tokenizer, example: Example) -> EncodedExample:
    prompt = prompt_ids(tokenizer, example.prompt)
    messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prompt)] != prompt:
        raise DeltafleetError("chat template: the full conversation does not start with the generation prompt")
    answer = full[len(prompt):]
    eot = end_of_turn_id(tokenizer)
    if eot not in answer:
        raise DeltafleetError(f"chat template: the assistant turn does not end with eos token id {eot}")
    end = len(answer) - answer[::-1].index(eot)
    return EncodedExample(prompt_ids=tuple(prompt), answer_ids=tuple(answer[:end]))
