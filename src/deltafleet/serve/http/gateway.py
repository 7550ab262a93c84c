"""The narrow interface between the HTTP layer and the engine (no torch here).

The HTTP layer only translates: OpenAI JSON in, `Generation` out, events back to JSON. Everything it needs
from the engine is the `Gateway` protocol below; `engine_gateway.EngineGateway` implements it on top of
`deltafleet.serve.engine.Engine` and is imported only by whoever builds a server (CLI, tests, benchmark).
Errors cross the boundary as the typed exceptions defined here, so routes map them to HTTP statuses without
knowing the engine's own exception classes; adapter states cross it as `AdapterState`, never as strings to parse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class GatewayError(Exception):
    """Base of the errors the gateway raises; `param` names the offending request field when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(GatewayError):
    """A parameter the engine refuses (HTTP 400)."""


class PromptTooLong(GatewayError):
    """Prompt + max_tokens exceed the context length (HTTP 400)."""


class UnknownModel(GatewayError):
    """No adapter of that name (HTTP 404)."""


class QueueFull(GatewayError):
    """The engine's waiting queue is at its bound (HTTP 429)."""


class ShuttingDown(GatewayError):
    """The server is draining and takes no new requests (HTTP 503)."""


class AdapterConflict(GatewayError):
    """An adapter of that name is already registered (HTTP 409)."""


@dataclass(frozen=True)
class Generation:
    """One generation request as the engine sees it. `adapter` None means the bare base model."""

    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Event:
    """A chunk of generated text; the last event of a request has `finish_reason` set.

    finish_reason: "stop" (stop token or string), "length" (max_tokens or context), "abort" (cancelled, e.g.
    by the shutdown deadline) or "error" (the request could not run; `error` says why).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class AdapterState(StrEnum):
    """A registered adapter's state; the values are the API's words (FAILED is "error": its load failed)."""

    ON_DISK = "on_disk"
    LOADING = "loading"
    HOST_MEMORY = "host_memory"
    RESIDENT = "resident"
    FAILED = "error"


@dataclass(frozen=True)
class AdapterInfo:
    """One registered adapter; `error` says why when `state` is FAILED."""

    name: str
    state: AdapterState
    kind: str | None = None
    detail: str | None = None  # rank or variant, e.g. "r=8, alpha=16"
    bytes: int | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


class Stream(Protocol):
    """A submitted request. Await `start` once, then iterate its events; `abort` frees its batch slot and KV cache
    at once. `replica` names the engine replica running it ("" for a single server's engine)."""

    replica: str

    async def start(self) -> None:
        """Wait until an engine accepted the request. Raises what `Gateway.submit` raises when the refusal
        comes from a remote engine (InvalidRequest, PromptTooLong, UnknownModel, QueueFull, ShuttingDown)."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def abort(self) -> None: ...

    @property
    def finished(self) -> bool: ...


class Gateway(Protocol):
    model_name: str  # the base model's public name; requests naming it use no adapter
    max_model_len: int

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt (the tokenizer's own special-token rules). Called on a worker
        thread. Raises PromptTooLong (param "prompt") for a text too long to fit the context however it encodes."""

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat conversation with the tokenizer's chat template and the assistant header. Called on
        a worker thread. Raises InvalidRequest (param "messages") when the template refuses it, PromptTooLong when
        the text cannot fit the context."""

    def submit(self, generation: Generation) -> Stream:
        """Queue a request (never blocks). Raises InvalidRequest, PromptTooLong, UnknownModel, QueueFull or
        ShuttingDown here or from the stream's `start`."""

    def adapter_names(self) -> list[str]: ...

    def adapters(self) -> list[AdapterInfo]: ...

    def load_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        """Register an adapter directory under the adapters root and start loading it in the background."""

    def unload_adapter(self, name: str) -> None:
        """New requests for it fail at once (404); running ones finish first."""

    def replace_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        """New weights for a registered adapter, read and checked first (blocking), then swapped in atomically:
        running requests finish on the old weights, later ones get the new. Raises UnknownModel, InvalidRequest."""

    def stats(self) -> dict:
        """waiting, running, max_batch, generated_tokens, prompt_tokens, finished, resident_adapters,
        adapter_cache {hits, misses, evictions, host_evictions, loads}."""

    def replica_stats(self) -> dict[str, dict]:
        """`stats()` of every engine replica by replica name ({"": stats} for a single server's engine)."""

    @property
    def draining(self) -> bool: ...

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (ShuttingDown)."""

    def shutdown(self, deadline: float) -> None:
        """Let running requests finish within `deadline` seconds, abort the rest, stop the engine."""
