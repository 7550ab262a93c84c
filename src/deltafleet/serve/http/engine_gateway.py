"""`Gateway` on top of the multi-tenant `Engine`: the only module of the HTTP package that imports torch.

Engine exceptions become the gateway's typed errors through the tables below (by exception class, never by
message); engine adapter states map to `gateway.AdapterState`; engine events become `gateway.Event`s delivered
on the caller's asyncio loop by the engine's one asyncio bridge (`serve.engine.stream.AsyncStream`). Adapter
directories registered at run time must lie under the adapters root, and so must every file their load opens,
symlinks followed (`store.paths.confined_files`). Messages for clients name files relative to the adapters root.

Prompts are tokenized by `prompts.Prompts` (shared with the Ray Serve ingress, which tokenizes without an engine).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

from deltafleet.adapters.io import PEFT_CONFIG, adapter_layout, peek_config
from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.serve.engine import (
    Engine,
    EngineConfig,
    EngineShutdownError,
    PromptTooLongError,
    QueueFullError,
    Request,
    SamplingParams,
    TokenEvent,
    UnknownAdapterError,
)
from deltafleet.serve.engine.adapters import AdapterLoadError
from deltafleet.serve.engine.adapters import AdapterState as EngineAdapterState
from deltafleet.serve.engine.stream import AsyncStream
from deltafleet.serve.engine.types import InvalidParameterError
from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import (
    AdapterConflict,
    AdapterInfo,
    AdapterState,
    Event,
    GatewayError,
    Generation,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    ShuttingDown,
    UnknownModel,
)
from deltafleet.serve.http.prompts import Prompts
from deltafleet.store.manifest import MANIFEST
from deltafleet.store.paths import confined_files

ErrorTable = dict[type[Exception], tuple[type[GatewayError], str | None]]

# Engine exception -> (gateway error, the request parameter it concerns). The most specific class in an
# exception's MRO wins; an InvalidParameterError names its parameter itself (`field`, renamed by PARAMS).
SUBMIT_ERRORS: ErrorTable = {
    EngineShutdownError: (ShuttingDown, None),
    PromptTooLongError: (PromptTooLong, "prompt"),  # the HTTP layer renames it "messages" for chat
    QueueFullError: (QueueFull, None),
    UnknownAdapterError: (UnknownModel, "model"),
    InvalidParameterError: (InvalidRequest, None),
    ValueError: (InvalidRequest, None),  # any other refusal of the request's values
}
ADAPTER_ERRORS: ErrorTable = {  # registering or removing an adapter
    UnknownAdapterError: (UnknownModel, "name"),
    AdapterLoadError: (InvalidRequest, "path"),  # replace_adapter: the new weights failed to load; the old stay
    DeltafleetError: (AdapterConflict, "name"),
}
PARAMS = {"prompt_ids": "prompt"}  # engine field -> request parameter, where the names differ

STATES = {
    EngineAdapterState.ON_DISK: AdapterState.ON_DISK,
    EngineAdapterState.LOADING: AdapterState.LOADING,
    EngineAdapterState.HOST_MEMORY: AdapterState.HOST_MEMORY,
    EngineAdapterState.RESIDENT: AdapterState.RESIDENT,
    EngineAdapterState.FAILED: AdapterState.FAILED,
}


def gateway_error(e: Exception, table: ErrorTable) -> GatewayError:
    """The gateway error for engine exception `e` (one of the table's classes or a subclass)."""
    cls = next(c for c in type(e).__mro__ if c in table)
    error, param = table[cls]
    if isinstance(e, InvalidParameterError):
        param = PARAMS.get(e.field, e.field)
    return error(str(e), param)


def _event(ev: TokenEvent) -> Event:
    reason = ev.finish_reason.value if ev.finish_reason is not None else None
    return Event(ev.text, reason, ev.prompt_tokens, ev.completion_tokens, ev.error)


class EngineStream:
    """A submitted request as a gateway `Stream`: the bridge's `TokenEvent`s as `Event`s."""

    replica = ""

    def __init__(self, events: AsyncStream):
        self._events = events

    async def start(self) -> None:
        """Nothing to wait for: the engine refuses a request in `submit` itself."""

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for ev in self._events:
            yield _event(ev)

    def abort(self) -> None:
        self._events.abort()

    @property
    def finished(self) -> bool:
        return self._events.finished


class EngineGateway:
    def __init__(self, engine: Engine, model_name: str, adapters_root: str | Path | None = None):
        if engine.tokenizer is None:
            raise DeltafleetError("the HTTP server needs a tokenizer: the base checkpoint has no tokenizer files")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.config.max_model_len
        self.adapters_root = Path(adapters_root).resolve() if adapters_root is not None else None
        given = Path(adapters_root) if adapters_root is not None else None
        spellings = {str(self.adapters_root), str(given.absolute()), str(given)} - {"."} if given else set()
        self._root_prefixes = sorted((f"{s.rstrip('/')}/" for s in spellings), key=len, reverse=True)
        self.prompts = Prompts(self.tokenizer, self.max_model_len)
        self._draining = False
        self._lock = threading.Lock()
        if model_name in engine.adapters.names():
            raise DeltafleetError(f"adapter {model_name!r} has the base model's name; rename its directory")
        engine.start()

    @classmethod
    def from_pretrained(cls, base: str | Path, adapters_dir: str | Path | None, config: EngineConfig,
                        model_name: str | None = None) -> EngineGateway:
        engine = Engine.spawn(lambda: Engine.from_pretrained(base, adapters_dir, config))
        try:
            return cls(engine, model_name or default_model_name(base), adapters_dir)
        except BaseException:
            engine.shutdown()
            raise

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.prompts.chat_prompt(messages)

    # ------------------------------------------------------------------ generation
    def submit(self, g: Generation) -> EngineStream:
        if self._draining:
            raise ShuttingDown("the server is shutting down")
        try:
            params = SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p,
                                    top_k=g.top_k, seed=g.seed, stop=g.stop, ignore_eos=g.ignore_eos)
            request = Request(list(g.prompt_ids), params, adapter=g.adapter)
            return EngineStream(AsyncStream(self.engine, request))
        except tuple(SUBMIT_ERRORS) as e:
            raise gateway_error(e, SUBMIT_ERRORS) from None

    # ------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return self.engine.adapters.names()

    def adapters(self) -> list[AdapterInfo]:
        out = []
        for row in self.engine.adapters.listing():
            if "kind" in row:
                kind, detail, nbytes = row["kind"], row["summary"], row["bytes"]
            else:
                kind, detail, nbytes = describe_on_disk(Path(row["path"]))
            error = self.relative(row["error"]) if row["error"] else None
            out.append(AdapterInfo(row["name"], STATES[row["state"]], kind, detail, nbytes, error))
        return out

    def relative(self, text: str) -> str:
        """`text` with the adapters root's path taken out of the file paths it names (the engine's messages name
        files as it opened them)."""
        for prefix in self._root_prefixes:
            text = text.replace(prefix, "")
        return text.replace(str(self.adapters_root), ".") if self.adapters_root is not None else text

    def load_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        path = self.adapter_dir(name, relative_path)
        with self._lock:
            if name in self.engine.adapters.names():
                raise AdapterConflict(f"adapter {name!r} is already loaded; delete it first", "name")
            _adapter_call(self.engine.add_adapter, name, path)
        return next(a for a in self.adapters() if a.name == name)

    def replace_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        path = self.adapter_dir(name, relative_path)
        if name not in self.engine.adapters.names():
            raise UnknownModel(f"adapter {name!r} not found", "name")
        _adapter_call(self.engine.replace_adapter, name, path)
        return next(a for a in self.adapters() if a.name == name)

    def adapter_dir(self, name: str, relative_path: str) -> Path:
        """The adapter directory `relative_path` under the adapters root, with every file a load opens confined
        to the root; InvalidRequest naming the rule otherwise."""
        if self.adapters_root is None:
            raise InvalidRequest("this server has no adapters root (--adapters): it cannot load adapters", "path")
        P.check_name(name, "name")
        if not name or "/" in name or name.startswith(".") or name == self.model_name:
            raise InvalidRequest(f"name={name!r}: must be non-empty, contain no '/', not start with '.' and differ "
                                 f"from the base model's name", "name")
        P.check_name(relative_path, "path")
        try:
            path = (self.adapters_root / relative_path).resolve()
            inside, is_dir = path.is_relative_to(self.adapters_root), path.is_dir()
        except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
            raise InvalidRequest(f"path={relative_path!r}: cannot be resolved ({type(e).__name__})", "path") from None
        if not inside:
            raise InvalidRequest(f"path={relative_path!r}: adapters load only from under the adapters root", "path")
        if not is_dir:
            raise InvalidRequest(f"path={relative_path!r}: no such adapter directory under the adapters root", "path")
        try:
            confined_files(path, self.adapters_root)
            layout = adapter_layout(path)
        except ArtifactError as e:
            raise InvalidRequest(f"path={relative_path!r}: {self.relative(str(e))}", "path") from None
        if layout is None:
            raise InvalidRequest(f"path={relative_path!r}: not an adapter directory (needs {PEFT_CONFIG} or "
                                 f"{MANIFEST})", "path")
        return path

    def unload_adapter(self, name: str) -> None:
        _adapter_call(self.engine.remove_adapter, name)

    # ------------------------------------------------------------------ state
    def stats(self) -> dict:
        return self.engine.stats()

    def replica_stats(self) -> dict[str, dict]:
        return {"": self.stats()}

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_shutdown(self) -> None:
        self._draining = True

    def shutdown(self, deadline: float) -> None:
        self._draining = True
        self.engine.shutdown(deadline)


def _adapter_call(fn, *args) -> None:
    """An engine adapter operation, its exceptions translated to gateway errors by `ADAPTER_ERRORS`."""
    try:
        fn(*args)
    except tuple(ADAPTER_ERRORS) as e:
        raise gateway_error(e, ADAPTER_ERRORS) from None


def default_model_name(base: str | Path) -> str:
    """An embedded model's name, or the checkpoint directory's name."""
    return Path(str(base)).expanduser().name or str(base)


def describe_on_disk(path: Path) -> tuple[str | None, str | None, int | None]:
    """Kind, rank/variant summary and weight bytes of an adapter not loaded yet, from its config files only."""
    nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else None
    try:
        config = peek_config(path)
    except (ValueError, KeyError, TypeError, OSError):  # DeltafleetError is a ValueError
        return None, None, nbytes
    return config.kind, config.summary, nbytes
