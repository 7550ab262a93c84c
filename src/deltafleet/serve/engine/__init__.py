"""The multi-tenant generation engine (Python API): `Engine`, `EngineConfig`, `Request`, `SamplingParams`."""

from deltafleet.serve.engine.adapters import UnknownAdapterError
from deltafleet.serve.engine.config import EngineConfig
from deltafleet.serve.engine.engine import Engine
from deltafleet.serve.engine.types import (
    NO_ADAPTER,
    EngineShutdownError,
    FinishReason,
    PromptTooLongError,
    QueueFullError,
    Request,
    RequestOutput,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "NO_ADAPTER", "Engine", "EngineConfig", "EngineShutdownError", "FinishReason", "PromptTooLongError",
    "QueueFullError", "Request", "RequestOutput", "SamplingParams", "TokenEvent", "UnknownAdapterError",
]
