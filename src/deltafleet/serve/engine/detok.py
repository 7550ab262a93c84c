"""Incremental detokenization with stop strings.

Decoding the whole sequence each step is quadratic; instead decode a short window (as vLLM does) and emit
only text that is complete (no dangling UTF-8 replacement char). Text that could be the start of a stop string
is held back until it is known not to be one, so a stream never shows part of a stop string.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are already in `text`
        self.text = ""  # all decoded text so far (truncated at a stop string when one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token_id: int, visible: bool = True) -> bool:
        """Add one token; returns True when a stop string was found (text is then truncated before it)."""
        self.ids.append(token_id)
        if not visible:
            return False
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return False  # incomplete character: wait for the next token
        start = max(len(self.text) - self.hold, 0)  # a stop string may straddle old and new text
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            at = self.text.find(s, start)
            if at != -1:
                self.text = self.text[:at]
                return True
        return False

    def take(self, final: bool = False) -> str:
        """Text not yet handed out; keeps back a possible stop-string prefix unless final."""
        end = len(self.text) if final or not self.hold else max(len(self.text) - self.hold, self.emitted)
        chunk = self.text[self.emitted:end]
        self.emitted = end
        return chunk
