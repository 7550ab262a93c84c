"""Adapter residency: on-disk store -> host-memory LRU -> preallocated slots (S-LoRA / vLLM style).

- The store is a directory with one adapter per subdirectory (named after it), plus adapters added by path.
- Loading (read + validate + convert to serving form) runs on a background thread, never on the decode loop.
  The loop only copies a loaded adapter's own tensors into a free slot (`acquire`), a bounded memcpy.
- Host memory keeps loaded serving forms in an LRU bounded by bytes; compact kinds (quantized compressed
  deltas) are kept as stored and dequantized only when copied into a slot. Slots are reused least-recently-used
  among adapters that no running request holds.
- `remove(name)` stops new requests at once; requests already running keep the slot until they finish.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from deltafleet.adapters import Adapter, load_adapter
from deltafleet.adapters.serving import CompactForm, ServingForm, host_form
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import ModelConfig
from deltafleet.serve.engine.pools import Pool
from deltafleet.store.manifest import read_manifest


class UnknownAdapterError(DeltafleetError):
    """The requested adapter name is not registered (or was removed)."""


class AdapterState(StrEnum):
    """Where a registered adapter is; FAILED means its load failed (the manager keeps the error message)."""

    RESIDENT = "resident"  # in a slot, ready for the next batch
    HOST_MEMORY = "host_memory"  # loaded, waiting in the host-memory LRU
    LOADING = "loading"  # being read on the loader thread
    ON_DISK = "on_disk"  # registered, not loaded
    FAILED = "failed"


@dataclass
class AdapterStats:
    hits: int = 0  # acquire found the adapter resident
    misses: int = 0  # acquire had to copy it into a slot
    evictions: int = 0  # a resident adapter was evicted from its slot
    host_evictions: int = 0  # a loaded adapter was dropped from host memory
    loads: int = 0  # loads from disk completed


@dataclass
class _Entry:
    path: Path | None  # None: added in memory (kept in host memory, never evicted from it)
    removed: bool = False
    error: str | None = None
    future: Future | None = None
    refs: int = 0  # running requests holding it
    slot: tuple[Pool, int] | None = None
    info: dict = field(default_factory=dict)


class AdapterManager:
    def __init__(self, model_cfg: ModelConfig, dtype: torch.dtype, pools: list[Pool],
                 host_cache_bytes: int = 4 << 30, base_fingerprint: str | None = None):
        self.cfg, self.dtype, self.pools = model_cfg, dtype, pools
        self.host_cache_bytes = host_cache_bytes
        self.fingerprint = base_fingerprint
        self.entries: dict[str, _Entry] = {}
        self.host: OrderedDict[str, ServingForm | CompactForm] = OrderedDict()
        self.slot_owner: dict[tuple[int, int], str] = {}  # (id(pool), slot) -> name
        self.slot_lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recent first
        self.stats = AdapterStats()
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    # ------------------------------------------------------------------ registry of names
    def scan(self, directory: str | Path) -> list[str]:
        """Register every subdirectory of `directory` as an adapter named after it."""
        d = Path(directory)
        if not d.is_dir():
            raise DeltafleetError(f"{d}: adapters directory not found")
        names = []
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            self.add(sub.name, sub)
            names.append(sub.name)
        return names

    def add(self, name: str, path: str | Path) -> None:
        if not name or "/" in name:
            raise DeltafleetError(f"adapter name {name!r}: must be non-empty and contain no '/'")
        with self._lock:
            old = self.entries.get(name)
            if old is not None and not old.removed:
                raise DeltafleetError(f"adapter {name!r} is already registered")
            if old is not None and old.refs:
                raise DeltafleetError(f"adapter {name!r} is still being removed (in use by {old.refs} requests)")
            self.entries[name] = _Entry(None if path is None else Path(path))

    def add_loaded(self, name: str, adapter: Adapter) -> None:
        """Register an adapter object already in memory (tests, benchmarks, freshly trained adapters)."""
        form = self._form(name, adapter)
        self.add(name, None)
        with self._lock:
            e = self.entries[name]
            e.info = self._info(adapter, form, None)
            self.host[name] = form
            self.stats.loads += 1

    def _form(self, name: str, adapter: Adapter) -> ServingForm | CompactForm:
        form = host_form(adapter, self.dtype)
        if not any(p.accepts(form) for p in self.pools):
            raise DeltafleetError(
                f"adapter {name!r} ({adapter.config.kind}, {form.family} width {form.width}) fits no slot "
                f"pool: {', '.join(f'{p.name} ({p.family} width {p.width})' for p in self.pools)}"
            )
        return form

    @staticmethod
    def _info(adapter: Adapter, form: ServingForm | CompactForm, path: Path | None) -> dict:
        return {"kind": adapter.config.kind, "summary": adapter.config.summary,
                "targets": list(adapter.config.targets), "bytes": form.nbytes,
                "manifest": (read_manifest(path) or {}) if path is not None else {}}

    def remove(self, name: str) -> None:
        with self._lock:
            e = self._entry(name)
            e.removed = True
            self.host.pop(name, None)
            self._maybe_free(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self.entries.items() if not e.removed)

    def _entry(self, name: str) -> _Entry:
        e = self.entries.get(name)
        if e is None or e.removed:
            raise UnknownAdapterError(f"adapter {name!r} not found")
        return e

    # ------------------------------------------------------------------ loading
    def ensure_loading(self, name: str) -> None:
        """Start a background load if the adapter is neither in host memory nor loading."""
        with self._lock:
            e = self._entry(name)
            if name in self.host or e.slot is not None or (e.future and not e.future.done()) or e.error:
                return
            e.future = self._executor.submit(self._load, name, e.path)

    def _load(self, name: str, path: Path) -> None:
        try:
            adapter = load_adapter(path, self.cfg, expected_fingerprint=self.fingerprint)
            form = self._form(name, adapter)
            info = self._info(adapter, form, path)
        except (DeltafleetError, ValueError, OSError) as err:
            with self._lock:
                if name in self.entries:
                    self.entries[name].error = str(err)
            return
        with self._lock:
            e = self.entries.get(name)
            if e is None or e.removed:
                return
            e.info = info
            self.host[name] = form
            self.host.move_to_end(name)
            self.stats.loads += 1
            self._trim_host()

    def _trim_host(self) -> None:
        total = sum(f.nbytes for f in self.host.values())
        for name in list(self.host):
            if total <= self.host_cache_bytes:
                break
            e = self.entries[name]
            if e.refs == 0 and e.path is not None and len(self.host) > 1:
                total -= self.host.pop(name).nbytes
                self.stats.host_evictions += 1

    def status(self, name: str) -> AdapterState:
        """The adapter's state; `error(name)` says why when it is FAILED."""
        with self._lock:
            e = self._entry(name)
            if e.error:
                return AdapterState.FAILED
            if e.slot is not None:
                return AdapterState.RESIDENT
            if name in self.host:
                return AdapterState.HOST_MEMORY
            if e.future is not None and not e.future.done():
                return AdapterState.LOADING
            return AdapterState.ON_DISK

    def error(self, name: str) -> str | None:
        with self._lock:
            return self._entry(name).error

    def wait_loaded(self, name: str, timeout: float | None = None) -> None:
        self.ensure_loading(name)
        f = self.entries[name].future
        if f is not None:
            f.result(timeout=timeout)
        if err := self.error(name):
            raise DeltafleetError(err)

    # ------------------------------------------------------------------ slots (engine loop only)
    def acquire(self, name: str) -> tuple[Pool, int] | None:
        """Make `name` resident and take a reference; None if not loaded yet or every slot is busy."""
        with self._lock:
            e = self._entry(name)
            if e.slot is not None:
                self.stats.hits += 1
                e.refs += 1
                self.slot_lru.move_to_end(name)
                return e.slot
            form = self.host.get(name)
            if form is None:
                self.ensure_loading(name)
                return None
            for pool in self.pools:
                if not pool.accepts(form):
                    continue
                slot = self._free_slot(pool)
                if slot is None:
                    continue
                pool.write(slot, form.materialize())
                self.slot_owner[(id(pool), slot)] = name
                e.slot = (pool, slot)
                e.refs += 1
                self.slot_lru[name] = None
                self.host.move_to_end(name)
                self.stats.misses += 1
                return e.slot
            return None

    def _free_slot(self, pool: Pool) -> int | None:
        for slot in range(pool.slots):
            if (id(pool), slot) not in self.slot_owner:
                return slot
        for victim in self.slot_lru:  # least recently used first
            ve = self.entries[victim]
            if ve.refs == 0 and ve.slot is not None and ve.slot[0] is pool:
                slot = ve.slot[1]
                self._evict(victim)
                return slot
        return None

    def _evict(self, name: str) -> None:
        e = self.entries[name]
        pool, slot = e.slot
        pool.clear(slot)
        del self.slot_owner[(id(pool), slot)]
        self.slot_lru.pop(name, None)
        e.slot = None
        self.stats.evictions += 1

    def release(self, name: str) -> None:
        with self._lock:
            e = self.entries[name]
            e.refs -= 1
            self._maybe_free(name)

    def _maybe_free(self, name: str) -> None:
        e = self.entries[name]
        if e.removed and e.refs == 0:
            if e.slot is not None:
                self._evict(name)
                self.stats.evictions -= 1  # a removal, not a capacity eviction
            del self.entries[name]

    def listing(self) -> list[dict]:
        """One row per adapter: name, path, state (`AdapterState`), error (None unless FAILED), and once loaded
        kind, summary, targets, bytes, manifest."""
        with self._lock:
            out = []
            for name in self.names():
                e = self.entries[name]
                out.append({"name": name, "path": None if e.path is None else str(e.path),
                            "state": self.status(name), "error": e.error, **e.info})
            return out

    @property
    def resident_count(self) -> int:
        return len(self.slot_owner)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
