"""`Gateway` on top of the multi-tenant `Engine`: the only module of the HTTP package that imports torch.

Engine exceptions become the gateway's typed errors here; engine events become `gateway.Event`s delivered on
the caller's asyncio loop. Adapter directories registered at run time must lie under the adapters root.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from deltafleet.adapters.io import MANIFEST, PEFT_CONFIG, read_manifest
from deltafleet.adapters.peft_format import PEFT_FORMATS
from deltafleet.adapters.registry import get_kind
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import PROJECTIONS
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
from deltafleet.serve.http.gateway import (
    AdapterConflict,
    AdapterInfo,
    Event,
    Generation,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    ShuttingDown,
    UnknownModel,
)

_STATES = {"resident": "resident", "host": "host_memory", "loading": "loading", "disk": "on_disk"}


def _param_of(message: str) -> str | None:
    """SamplingParams errors read "field=value: rule"; the field is the request parameter."""
    head = message.split("=", 1)[0].split(":", 1)[0].strip()
    return head if head.isidentifier() else None


class EngineStream:
    """Events of one submitted request, delivered on the submitting coroutine's event loop."""

    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._id = request.request_id
        self._finished = False
        self._handle = engine.submit(request, on_event=self._on_event)

    def _on_event(self, ev: TokenEvent) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self._engine.abort(self._id)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self._finished:
            ev = await self._queue.get()
            reason = ev.finish_reason.value if ev.finish_reason is not None else None
            self._finished = reason is not None
            yield Event(ev.text, reason, ev.prompt_tokens, ev.completion_tokens, ev.error)

    def abort(self) -> None:
        if not self._handle.done.is_set():
            self._engine.abort(self._id)

    @property
    def finished(self) -> bool:
        return self._finished or self._handle.done.is_set()


class EngineGateway:
    def __init__(self, engine: Engine, model_name: str, adapters_root: str | Path | None = None):
        if engine.tokenizer is None:
            raise DeltafleetError("the HTTP server needs a tokenizer: the base checkpoint has no tokenizer files")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.config.max_model_len
        self.adapters_root = Path(adapters_root).resolve() if adapters_root is not None else None
        self._draining = False
        self._lock = threading.Lock()
        if model_name in engine.adapters.names():
            raise DeltafleetError(f"adapter {model_name!r} has the base model's name; rename its directory")
        engine.start()

    @classmethod
    def from_pretrained(cls, base: str | Path, adapters_dir: str | Path | None, config: EngineConfig,
                        model_name: str | None = None) -> EngineGateway:
        engine = Engine.from_pretrained(base, adapters_dir, config)
        return cls(engine, model_name or default_model_name(base), adapters_dir)

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja's TemplateError and friends: the template refused the conversation
            raise InvalidRequest(f"messages: the chat template refused the conversation ({e})", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # ------------------------------------------------------------------ generation
    def submit(self, g: Generation) -> EngineStream:
        if self._draining:
            raise ShuttingDown("the server is shutting down")
        try:
            params = SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p,
                                    top_k=g.top_k, seed=g.seed, stop=g.stop, ignore_eos=g.ignore_eos)
            request = Request(list(g.prompt_ids), params, adapter=g.adapter)
            return EngineStream(self.engine, request)
        except EngineShutdownError as e:
            raise ShuttingDown(str(e)) from None
        except PromptTooLongError as e:
            raise PromptTooLong(str(e), "prompt") from None
        except QueueFullError as e:
            raise QueueFull(str(e)) from None
        except UnknownAdapterError as e:
            raise UnknownModel(str(e), "model") from None
        except ValueError as e:
            msg = str(e)
            param = _param_of(msg)
            raise InvalidRequest(msg, "prompt" if param == "prompt_ids" else param) from None

    # ------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return self.engine.adapters.names()

    def adapters(self) -> list[AdapterInfo]:
        out = []
        for row in self.engine.adapters.listing():
            state, error = row["state"], None
            if state.startswith("error: "):
                state, error = "error", state[len("error: "):]
            else:
                state = _STATES[state]
            if "kind" in row:
                kind, detail, nbytes = row["kind"], row["summary"], row["bytes"]
            else:
                kind, detail, nbytes = describe_on_disk(Path(row["path"]))
            out.append(AdapterInfo(row["name"], state, kind, detail, nbytes, error))
        return out

    def load_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        if self.adapters_root is None:
            raise InvalidRequest("this server has no adapters root (--adapters): it cannot load adapters", "path")
        if not name or "/" in name or name.startswith(".") or name == self.model_name:
            raise InvalidRequest(f"name={name!r}: must be non-empty, contain no '/', not start with '.' and differ "
                                 f"from the base model's name", "name")
        path = (self.adapters_root / relative_path).resolve()
        if not path.is_relative_to(self.adapters_root):
            raise InvalidRequest(f"path={relative_path!r}: adapters load only from under the adapters root", "path")
        if not path.is_dir():
            raise InvalidRequest(f"path={relative_path!r}: no such adapter directory under the adapters root", "path")
        if not (path / PEFT_CONFIG).is_file() and not (path / MANIFEST).is_file():
            raise InvalidRequest(f"path={relative_path!r}: not an adapter directory (needs {PEFT_CONFIG} or "
                                 f"{MANIFEST})", "path")
        with self._lock:
            if name in self.engine.adapters.names():
                raise AdapterConflict(f"adapter {name!r} is already loaded; delete it first", "name")
            try:
                self.engine.add_adapter(name, path)
            except UnknownAdapterError as e:
                raise UnknownModel(str(e), "name") from None
            except DeltafleetError as e:
                raise AdapterConflict(str(e), "name") from None
        return next(a for a in self.adapters() if a.name == name)

    def unload_adapter(self, name: str) -> None:
        try:
            self.engine.remove_adapter(name)
        except UnknownAdapterError as e:
            raise UnknownModel(str(e), "name") from None

    # ------------------------------------------------------------------ state
    def stats(self) -> dict:
        return self.engine.stats()

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_shutdown(self) -> None:
        self._draining = True

    def shutdown(self, deadline: float) -> None:
        self._draining = True
        self.engine.shutdown(deadline)


def default_model_name(base: str | Path) -> str:
    """An embedded model's name, or the checkpoint directory's name."""
    return Path(str(base)).expanduser().name or str(base)


def describe_on_disk(path: Path) -> tuple[str | None, str | None, int | None]:
    """Kind, rank/variant summary and weight bytes of an adapter not loaded yet, from its config files only."""
    nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else None
    try:
        cfg_path = path / PEFT_CONFIG
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            fmt = PEFT_FORMATS.get(cfg.get("peft_type"))
            if fmt is None:
                return None, None, nbytes
            config = fmt.config_from_peft(cfg, PROJECTIONS, cfg_path)
        else:
            manifest = read_manifest(path) or {}
            config = get_kind(str(manifest.get("kind"))).config_from_dict(manifest["config"])
    except (DeltafleetError, ValueError, KeyError, TypeError, OSError):
        return None, None, nbytes
    return config.kind, config.summary, nbytes
