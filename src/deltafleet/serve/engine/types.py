"""Typed requests, sampling parameters and events: the engine's narrow interface."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum

NO_ADAPTER: int = -1
"""Slot index meaning "base model, no adapter" in every batch layout."""

_ids = itertools.count()


class FinishReason(StrEnum):
    STOP = "stop"  # a stop token id or stop string
    LENGTH = "length"  # max_tokens reached (or the context is full)
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # could not run (e.g. its adapter failed to load); see `error`


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens >= 1; temperature 0 means greedy; top_p in (0, 1]; top_k 0 means off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature!r}: must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class Request:
    """One generation request. `adapter` is an adapter name, or None for the bare base model."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids: a prompt needs at least one token")


@dataclass(frozen=True)
class TokenEvent:
    """One streamed step of a request: a new token (and its text), and whether the request finished."""

    request_id: str
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    adapter: str | None
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    time_to_first_token: float
    latency: float
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
