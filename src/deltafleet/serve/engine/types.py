"""Typed requests, sampling parameters and events: the engine's narrow interface."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum

from deltafleet.errors import DeltafleetError

NO_ADAPTER: int = -1
"""Slot index meaning "base model, no adapter" in every batch layout."""

_ids = itertools.count()
_NO_VALUE = object()


class InvalidParameterError(DeltafleetError):
    """A request parameter the engine refuses. `field` names it (a `SamplingParams` or `Request` field), so
    callers map it to their own parameter names without reading the message."""

    def __init__(self, field: str, rule: str, value: object = _NO_VALUE):
        self.field, self.rule, self.value = field, rule, value
        super().__init__(f"{field}: {rule}" if value is _NO_VALUE else f"{field}={value!r}: {rule}")


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
            raise InvalidParameterError("max_tokens", "must be an integer >= 1", self.max_tokens)
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidParameterError("temperature", "must be in [0, 2]", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", "must be in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidParameterError("top_k", "must be an integer >= 0", self.top_k)
        if any(not s for s in self.stop):
            raise InvalidParameterError("stop", "stop strings must be non-empty")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            raise InvalidParameterError("seed", "must be an integer in [-2**63, 2**64) (torch.Generator's range)",
                                        self.seed)

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
            raise InvalidParameterError("prompt_ids", "a prompt needs at least one token")


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


class QueueFullError(DeltafleetError):
    """More requests are waiting than `max_queue` allows."""


class PromptTooLongError(DeltafleetError):
    """prompt tokens + max_tokens exceed the engine's max_model_len."""


class EngineShutdownError(DeltafleetError):
    """The engine is shutting down and takes no new requests."""
