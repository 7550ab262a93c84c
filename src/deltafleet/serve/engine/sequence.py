"""The engine's per-request state (`Seq`): created by `Engine.submit`, advanced by every step, completed once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from deltafleet.serve.engine.adapters import Lease
from deltafleet.serve.engine.detok import Detokenizer
from deltafleet.serve.engine.types import FinishReason, Request, RequestOutput, TokenEvent


@dataclass
class Seq:
    """One request inside the engine: its sampling state, KV slot, adapter lease, output so far and timings."""

    req: Request
    on_event: Callable[[TokenEvent], None] | None
    detok: Detokenizer | None
    gen: torch.Generator | None
    stop_ids: frozenset[int]
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float = 0.0
    kv: int = -1
    lease: Lease | None = None  # its adapter version's slot, held while running
    computed: int = 0  # prompt tokens in the KV cache
    out: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    error: str | None = None
    aborted: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: RequestOutput | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prompt_len

    @property
    def decode_position(self) -> int:
        """The position of its next decode step's input token, the last one sampled (`out[-1]`)."""
        return self.prompt_len + len(self.out) - 1
