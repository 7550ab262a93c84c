"""Prompt text -> token ids with the base model's tokenizer: raw completion prompts and chat conversations.

A prompt text longer than the context length times the tokenizer's longest token (in characters) cannot fit
whatever it encodes to, so it is refused before tokenization (a multi-megabyte prompt would otherwise take
seconds and hundreds of megabytes to tokenize, only to be refused). No torch here: the Ray Serve ingress
tokenizes with this alone and sends token ids to the engine replicas.
"""

from __future__ import annotations

from jinja2 import TemplateError

from deltafleet.serve.http.gateway import InvalidRequest, PromptTooLong


class Prompts:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_prompt_chars = max_model_len * max(map(len, tokenizer.get_vocab()))

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise PromptTooLong(f"{param}: {chars} characters of text cannot fit in the context length "
                                f"{self.max_model_len} (at most {self.max_prompt_chars} can)", param)

    def encode(self, text: str) -> list[int]:
        self._check_length(len(text), "prompt")
        return list(self.tokenizer.encode(text))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except TemplateError as e:  # the template refused the conversation (its raise_exception message)
            raise InvalidRequest(f"messages: the chat template refused the conversation ({e})", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
