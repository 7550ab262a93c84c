"""Adapter residency: on-disk store -> host-memory LRU -> preallocated slots (S-LoRA / vLLM style).

- The store is a directory with one adapter per subdirectory (named after it), plus adapters added by path.
- Loading (read + validate + convert to serving form) runs on a background thread, never on the decode loop.
  The loop only copies a loaded adapter's own tensors into a free slot (`acquire`), a bounded memcpy.
  Every load failure, whatever its exception class, leaves the adapter FAILED with its message, logged once;
  nothing retries it (remove and add it again, or `replace` it).
- Host memory keeps loaded serving forms in an LRU bounded by bytes; compact kinds (quantized compressed
  deltas) are kept quantized: in the qadditive form when a pool of it exists (copied into a slot as they are),
  else as stored and dequantized only when copied into a slot. Expansions staged ahead of a slot copy
  (at most MAX_STAGED) count against the same bound. Slots are reused least-recently-used
  among adapters that no running request holds.
- A registered name points at one version (`_Entry`). `remove(name)` and `replace(name, ...)` detach that version
  at once: new requests see the name gone (or the new weights), requests already running keep their `Lease` on
  the old version's slot, and the slot is freed when the last of them releases it (at once if none runs).
- Any thread may call `add`, `remove`, `replace` and `listing`; pool mutations happen under the manager's lock
  (and under inference mode, `pools.Pool`), and only ever touch slots no running request holds.
- `resident_count` counts the listed adapters whose state is RESIDENT: a detached version still finishing its
  requests holds its slot (`slots_in_use`) but is no longer listed.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import torch

from deltafleet.adapters import Adapter, load_adapter
from deltafleet.adapters.qadditive import QADDITIVE
from deltafleet.adapters.serving import CompactForm, ServingForm, host_forms
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import ModelConfig
from deltafleet.native import openmp
from deltafleet.serve.engine.pools import Pool
from deltafleet.store.manifest import read_manifest
from deltafleet.store.paths import confined_files

log = logging.getLogger(__name__)


class UnknownAdapterError(DeltafleetError):
    """The requested adapter name is not registered (or was removed)."""


class AdapterLoadError(DeltafleetError):
    """An adapter's weights could not be read, validated, converted or copied into a slot."""


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
    loads: int = 0  # loads from disk completed (preloads included)
    preloads: int = 0  # of which read ahead by `preload`, not for a request


MAX_STAGED = 32  # expanded compact forms kept for their slot copy (Delta-CoMe 1/64 on SmolLM2: 24 MB each)


@dataclass
class LoadTimings:
    """Seconds of the latest cold paths (bounded): `to_host` from the first request for an adapter not in host
    memory to its form being there (queueing behind other loads included), `to_slot` of each copy into a slot."""

    to_host: deque = field(default_factory=lambda: deque(maxlen=4096))
    to_slot: deque = field(default_factory=lambda: deque(maxlen=4096))


@dataclass(eq=False)
class _Entry:
    """One version of a named adapter."""

    name: str
    path: Path | None  # None: added in memory (kept in host memory, never evicted from it)
    removed: bool = False  # detached by remove/replace: only finishes the requests that hold it
    error: str | None = None
    future: Future | None = None
    requested: float | None = None  # perf_counter when a request first asked for its current load (None: no request)
    refs: int = 0  # running requests holding it
    slot: tuple[Pool, int] | None = None
    info: dict = field(default_factory=dict)
    root: Path | None = None  # set: every file the load opens must resolve inside this directory


@dataclass(frozen=True, eq=False)
class Lease:
    """A running request's hold on one adapter version's slot; give it back with `AdapterManager.release`."""

    name: str
    pool: Pool
    slot: int
    entry: _Entry = field(repr=False)


def loader_thread_init() -> None:
    """A loader thread runs its torch ops on one OpenMP thread (`native.openmp.single_thread`), set before its first
    parallel op, so it never gets an OpenMP team of its own: a team's idle workers count against the cores for
    libgomp, and with more OpenMP threads than cores every parallel region of the engine loop waits for its workers
    to wake. Once a loader had run one two-thread op, a bf16 576x576 projection of 32 rows took 250-350 us instead
    of 130, and a RoAd call 90-114 us instead of 13 (2-core AMD EPYC; the thread idle). Loads are many small ops:
    one thread is also their fastest."""
    openmp.single_thread()


class AdapterManager:
    def __init__(self, model_cfg: ModelConfig, dtype: torch.dtype, pools: list[Pool],
                 host_cache_bytes: int = 4 << 30, base_fingerprint: str | None = None, loader_threads: int = 1):
        self.cfg, self.dtype, self.pools = model_cfg, dtype, pools
        self.host_cache_bytes = host_cache_bytes
        self.fingerprint = base_fingerprint
        self.entries: dict[str, _Entry] = {}  # the registered (listed) version of each name
        self.host: OrderedDict[str, ServingForm | CompactForm] = OrderedDict()  # registered names only
        self.slot_owner: dict[tuple[int, int], _Entry] = {}  # (id(pool), slot) -> the version in it
        self.slot_lru: OrderedDict[str, None] = OrderedDict()  # resident registered names, least recent first
        self.stats = AdapterStats()
        self.timings = LoadTimings()
        # compact forms expanded ahead of their slot copy, on the loader thread (name -> (form, expanded)): the
        # engine loop then only copies (Delta-CoMe at 1/64 on SmolLM2: 0.33-0.47 s to expand, ms to copy)
        self.staged: OrderedDict[str, tuple[CompactForm, ServingForm]] = OrderedDict()
        self._staging: set[str] = set()
        self._stage_failed: set[str] = set()  # expanded on the loop instead, so the failure fails the adapter
        self._lock = threading.RLock()
        self._executor = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="adapter-loader",
                                            initializer=loader_thread_init)
        self._preload: deque[str] = deque()  # names `preload` still has to read, in order
        self._preloading = False  # a preload job is queued or running on the loader

    # ------------------------------------------------------------------ registry of names (any thread)
    def scan(self, directory: str | Path) -> list[str]:
        """Register every subdirectory of `directory` as an adapter named after it, confined to `directory`: every
        file a load of these adapters opens must resolve inside it (a subdirectory or a weights file symlinked out
        of the root is registered, and fails its load with the rule, as a runtime load through the server does)."""
        d = Path(directory)
        if not d.is_dir():
            raise DeltafleetError(f"{d}: adapters directory not found")
        names = []
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            self._register(_Entry(sub.name, sub, root=d))
            names.append(sub.name)
        return names

    def add(self, name: str, path: str | Path) -> None:
        """Register an adapter directory under `name` (loaded later, on the loader thread)."""
        self._register(_Entry(name, Path(path)))

    def add_loaded(self, name: str, adapter: Adapter) -> None:
        """Register an adapter object already in memory (tests, benchmarks, freshly trained adapters)."""
        form = self._form(name, adapter)
        e = _Entry(name, None, info=self._info(adapter, form, None))
        with self._lock:
            self._register(e)
            self._put_host(e, form)

    def _register(self, e: _Entry) -> None:
        if not e.name or "/" in e.name:
            raise DeltafleetError(f"adapter name {e.name!r}: must be non-empty and contain no '/'")
        with self._lock:
            if e.name in self.entries:
                raise DeltafleetError(f"adapter {e.name!r} is already registered")
            self.entries[e.name] = e

    def replace(self, name: str, source: str | Path | Adapter) -> None:
        """Swap the weights registered under `name` atomically: requests admitted before the swap finish on the old
        weights, every later one gets the new. The new weights are read and validated first; the caller blocks
        while a directory is read, on the loader thread (torch ops on the caller's thread would give it an OpenMP
        team that slows the engine loop, see `loader_thread_init`). If that fails, `AdapterLoadError` is raised and
        nothing changed."""
        with self._lock:
            self._entry(name)
        if isinstance(source, Adapter):
            form = self._form(name, source)
            new = _Entry(name, None, info=self._info(source, form, None))
        else:  # the caller chose this path (the HTTP gateway confines it to the adapters root first)
            path = Path(source)
            form, expanded, info = self._executor.submit(self._read, name, path).result()
            new = _Entry(name, path, info=info)
        with self._lock:
            self._detach(self._entry(name))
            self._register(new)
            self._put_host(new, form)
            if isinstance(source, Adapter) or not isinstance(form, CompactForm):
                return
            self._put_staged(name, form, expanded)  # the serving form the read built, for the slot copy

    def remove(self, name: str) -> None:
        """Unregister `name` at once; its slot is freed now if no running request holds it, else at the last
        release."""
        with self._lock:
            self._detach(self._entry(name))

    def _detach(self, e: _Entry) -> None:
        e.removed = True
        del self.entries[e.name]
        self.host.pop(e.name, None)
        self.staged.pop(e.name, None)
        self._stage_failed.discard(e.name)  # a new version under the name is expanded off the loop again
        self.slot_lru.pop(e.name, None)
        if e.future is not None:
            e.future.cancel()
        if e.refs == 0 and e.slot is not None:
            self._free(e)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.entries)

    def _entry(self, name: str) -> _Entry:
        e = self.entries.get(name)
        if e is None:
            raise UnknownAdapterError(f"adapter {name!r} not found")
        return e

    # ------------------------------------------------------------------ loading
    def _form(self, name: str, adapter: Adapter) -> ServingForm | CompactForm:
        return self._forms(name, adapter)[0]

    def _forms(self, name: str, adapter: Adapter) -> tuple[ServingForm | CompactForm, ServingForm]:
        """(host form, serving form), or DeltafleetError when no pool takes it. A quantized form that no pool takes
        now (wider than the qdelta pool, or of another group size than the tenants in it) is served expanded."""
        form, expanded = host_forms(adapter, self.dtype, frozenset(p.family for p in self.pools if p.slots))
        if form.family == QADDITIVE and not any(p.accepts(form) for p in self.pools):
            form, expanded = host_forms(adapter, self.dtype)
        if not any(p.accepts(form) for p in self.pools):
            raise DeltafleetError(
                f"adapter {name!r} ({adapter.config.kind}, {form.family} width {form.width}) fits no slot "
                f"pool: {', '.join(f'{p.name} ({p.family} width {p.width})' for p in self.pools)}"
            )
        return form, expanded

    @staticmethod
    def _info(adapter: Adapter, form: ServingForm | CompactForm, path: Path | None) -> dict:
        parts = adapter.parts_nbytes
        summary = adapter.config.summary
        if set(parts) - {"projections"}:  # a whole fine-tune: say what each part holds
            summary += "; " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in parts.items())
        return {"kind": adapter.config.kind, "summary": summary, "parts": parts,
                "targets": list(adapter.config.targets), "bytes": form.nbytes,
                "manifest": (read_manifest(path) or {}) if path is not None else {}}

    def _read(self, name: str, path: Path, root: Path | None = None
              ) -> tuple[ServingForm | CompactForm, ServingForm, dict]:
        """Read, validate and convert one adapter directory: (host form, serving form, info); any failure becomes
        `AdapterLoadError`."""
        try:
            if root is not None:
                confined_files(path, root)
            adapter = load_adapter(path, self.cfg, expected_fingerprint=self.fingerprint)
            form, expanded = self._forms(name, adapter)
            return form, expanded, self._info(adapter, form, path)
        except Exception as err:  # noqa: BLE001 (a malformed file may raise anything: KeyError, TypeError, ...)
            detail = str(err) if isinstance(err, DeltafleetError) else f"{type(err).__name__}: {err}"
            raise AdapterLoadError(f"adapter {name!r} failed to load: {detail}") from err

    def ensure_loading(self, name: str) -> None:
        """Start a background load if the adapter is neither in host memory nor loading nor FAILED; a compact form
        in host memory and not resident is expanded in the background (`stage`) instead."""
        with self._lock:
            e = self._entry(name)
            if e.future is not None and not e.future.done() and e.requested is None:
                e.requested = time.perf_counter()  # being preloaded: the request waits for that read
            if self._busy(e):
                return
            if name in self.host:
                self._stage_later(e)
                return
            e.requested = time.perf_counter()
            e.future = self._executor.submit(self._load, e)

    @staticmethod
    def _busy(e: _Entry) -> bool:
        """Nothing to read for `e` now: in a slot, being read, or FAILED."""
        return e.slot is not None or (e.future is not None and not e.future.done()) or bool(e.error)

    def _stage_later(self, e: _Entry) -> None:
        form = self.host.get(e.name)
        if isinstance(form, CompactForm) and e.name not in self.staged and e.name not in self._staging:
            self._staging.add(e.name)
            self._executor.submit(self._stage, e, form)

    def _stage(self, e: _Entry, form: CompactForm) -> None:  # loader thread
        try:
            expanded = form.materialize()
        except Exception:  # noqa: BLE001 (acquire expands it again and fails the adapter with the reason)
            expanded = None
        with self._lock:
            self._staging.discard(e.name)
            if expanded is None:
                self._stage_failed.add(e.name)
            if expanded is None or e.removed or e.slot is not None or self.host.get(e.name) is not form:
                return
            self._put_staged(e.name, form, expanded)

    def _put_staged(self, name: str, form: CompactForm, expanded: ServingForm) -> None:
        self.staged[name] = (form, expanded)
        while len(self.staged) > MAX_STAGED:
            self.staged.popitem(last=False)
        self._trim_host()

    def _ready(self, e: _Entry, form: ServingForm | CompactForm) -> bool:
        """Whether `form` may be copied into a slot now: a compact form only once expanded off the loop (or once
        its expansion failed, to fail the adapter with the reason); else its expansion is started."""
        if not isinstance(form, CompactForm) or e.name in self._stage_failed:
            return True
        staged = self.staged.get(e.name)
        if staged is not None and staged[0] is form:
            return True
        self._stage_later(e)
        return False

    def _expanded(self, name: str, form: ServingForm | CompactForm) -> ServingForm:
        """`form` ready for a slot: the staged expansion when it is of this very form, else expanded now."""
        staged = self.staged.pop(name, None)
        if staged is not None and staged[0] is form:
            return staged[1]
        return form.materialize()

    def _load(self, e: _Entry, preload: bool = False) -> None:  # loader thread
        """Read `e` into host memory (a preload keeps it only if it fits without evicting, else stops preloading)."""
        try:
            form, expanded, info = self._read(e.name, e.path, e.root)
        except AdapterLoadError as err:
            log.error("%s", err)  # once: the entry stays FAILED and nothing retries it
            with self._lock:
                e.error = str(err)
            return
        with self._lock:
            if e.removed:
                return
            e.info = info
            if preload and e.requested is None and self._host_bytes() + form.nbytes > self.host_cache_bytes:
                self._preload.clear()  # full: what is read from now on is read for requests
                return
            if e.requested is not None:
                self.timings.to_host.append(time.perf_counter() - e.requested)
                e.requested = None
            self.stats.preloads += preload
            self._put_host(e, form)
            if isinstance(form, CompactForm) and e.slot is None:  # loaded for a waiting request: keep the serving
                self._put_staged(e.name, form, expanded)         # form built to validate it, for its slot copy

    def preload(self, names: list[str] | None = None) -> None:
        """Read registered adapters (`names`, default all, in order) into host memory in the background, as S-LoRA
        keeps every adapter in main memory: a request for one then waits only for its copy into a slot. Preloading
        never evicts: it stops at the first adapter that would not fit in `host_cache_bytes`. It runs one adapter at
        a time on the loader threads, and a request's load queued meanwhile runs before the next one."""
        with self._lock:
            self._preload.extend(self.names() if names is None else names)
            if not self._preloading and self._preload:
                self._preloading = True
                self._executor.submit(self._preload_next)

    @property
    def preloading(self) -> bool:
        """A preload is still reading adapters."""
        with self._lock:
            return self._preloading

    def _preload_next(self) -> None:  # loader thread
        with self._lock:
            e = None
            while self._preload and e is None:
                cand = self.entries.get(self._preload.popleft())
                e = None if cand is None or self._busy(cand) or cand.name in self.host else cand
            if e is not None:
                e.future = future = Future()
                future.set_running_or_notify_cancel()
        if e is None:
            # The preloaded tenants are long-lived: keep the cyclic collector from scanning them again and again
            # (1000 density tenants are 1.4M Python objects, a full collection 0.7 s of a stalled engine). Frozen
            # objects are still freed by reference counting when a tenant goes.
            gc.freeze()
            with self._lock:
                if self._preload:  # more names came meanwhile
                    self._schedule_preload()
                else:
                    self._preloading = False
            return
        try:
            self._load(e, preload=True)
        finally:
            future.set_result(None)
            with self._lock:
                self._schedule_preload()  # the next one, or the end (which freezes the tenants)

    def _schedule_preload(self) -> None:
        """(under the lock) The preload's next step on the loader, behind the loads requests queued meanwhile."""
        try:
            self._executor.submit(self._preload_next)
        except RuntimeError:  # shut down meanwhile
            self._preload.clear()
            self._preloading = False

    def _put_host(self, e: _Entry, form: ServingForm | CompactForm) -> None:
        self.host[e.name] = form
        self.host.move_to_end(e.name)
        self.stats.loads += 1
        self._trim_host()

    def _trim_host(self) -> None:
        """Keep host memory within `host_cache_bytes`: the loaded forms plus the expansions staged for slot copies
        (at most MAX_STAGED, each waiting for its copy: never dropped here, or a tenant could be staged and dropped
        forever) count; loaded forms no running request holds go, least recently used first."""
        total = self._host_bytes()
        for name in list(self.host):
            if total <= self.host_cache_bytes:
                break
            e = self.entries[name]
            if e.refs == 0 and e.path is not None and len(self.host) > 1:
                total -= self.host.pop(name).nbytes
                self.stats.host_evictions += 1

    def _host_bytes(self) -> int:
        """Bytes held in host memory: the loaded forms and the expansions staged for slot copies."""
        return sum(f.nbytes for f in self.host.values()) + sum(x.nbytes for _, x in self.staged.values())

    def _state(self, e: _Entry) -> AdapterState:
        if e.error:
            return AdapterState.FAILED
        if e.slot is not None:
            return AdapterState.RESIDENT
        if e.name in self.host:
            return AdapterState.HOST_MEMORY
        if e.future is not None and not e.future.done():
            return AdapterState.LOADING
        return AdapterState.ON_DISK

    def status(self, name: str) -> AdapterState:
        """The adapter's state; `error(name)` says why when it is FAILED."""
        with self._lock:
            return self._state(self._entry(name))

    def error(self, name: str) -> str | None:
        with self._lock:
            return self._entry(name).error

    def wait_loaded(self, name: str, timeout: float | None = None) -> None:
        """Block until `name` is loaded; `AdapterLoadError` if its load failed."""
        self.ensure_loading(name)
        with self._lock:
            e = self._entry(name)
        if e.future is not None:
            e.future.result(timeout=timeout)
        if e.error:
            raise AdapterLoadError(e.error)

    # ------------------------------------------------------------------ slots (acquire: engine loop only)
    def acquire(self, name: str) -> Lease | None:
        """Make `name` resident and take a reference; None if not loaded yet or every slot is busy.
        `AdapterLoadError` if copying it into a slot fails (the adapter is then FAILED)."""
        with self._lock:
            e = self._entry(name)
            if e.slot is not None:
                self.stats.hits += 1
                self.slot_lru.move_to_end(name)
                return self._lease(e)
            form = self.host.get(name)
            if form is None:
                self.ensure_loading(name)
                return None
            if not self._ready(e, form):
                return None  # being expanded on the loader thread
            for pool in self.pools:
                if not pool.accepts(form):
                    continue
                slot = self._free_slot(pool)
                if slot is None:
                    continue
                self.slot_owner[(id(pool), slot)] = e
                e.slot = (pool, slot)
                t0 = time.perf_counter()
                try:
                    pool.write(slot, self._expanded(name, form))
                except Exception as err:  # noqa: BLE001 (a bad form fails its adapter, not the engine loop)
                    self._free(e)
                    self.host.pop(name, None)
                    e.error = f"adapter {name!r} could not be placed in pool {pool.name!r}: {type(err).__name__}: {err}"
                    log.error("%s", e.error)
                    raise AdapterLoadError(e.error) from err
                self.slot_lru[name] = None
                self.host.move_to_end(name)
                self.stats.misses += 1
                self.timings.to_slot.append(time.perf_counter() - t0)
                return self._lease(e)
            return None

    @staticmethod
    def _lease(e: _Entry) -> Lease:
        e.refs += 1
        pool, slot = e.slot
        return Lease(e.name, pool, slot, e)

    def _free_slot(self, pool: Pool) -> int | None:
        for slot in range(pool.slots):
            if (id(pool), slot) not in self.slot_owner:
                return slot
        for victim in self.slot_lru:  # least recently used first
            ve = self.entries[victim]
            if ve.refs == 0 and ve.slot is not None and ve.slot[0] is pool:
                slot = ve.slot[1]
                self.slot_lru.pop(victim)
                self._free(ve)
                self.stats.evictions += 1
                return slot
        return None

    def _free(self, e: _Entry) -> None:
        pool, slot = e.slot
        del self.slot_owner[(id(pool), slot)]
        e.slot = None
        pool.clear(slot)

    def release(self, lease: Lease) -> None:
        """A running request is done with its adapter version; a detached version's slot is freed at its last."""
        with self._lock:
            e = lease.entry
            e.refs -= 1
            if e.removed and e.refs == 0 and e.slot is not None:
                self._free(e)

    # ------------------------------------------------------------------ views (any thread)
    def listing(self) -> list[dict]:
        """One row per adapter: name, path, state (`AdapterState`), error (None unless FAILED), and once loaded
        kind, summary, targets, bytes, manifest."""
        with self._lock:
            return [{"name": name, "path": None if e.path is None else str(e.path), "state": self._state(e),
                     "error": e.error, **e.info} for name, e in sorted(self.entries.items())]

    @property
    def resident_count(self) -> int:
        """Registered adapters in a slot: the RESIDENT rows of `listing()`."""
        with self._lock:
            return sum(self._state(e) is AdapterState.RESIDENT for e in self.entries.values())

    def residency(self) -> tuple[list[str], int]:
        """(registered adapters resident in a slot, slots holding nothing), for a router's view of this engine."""
        with self._lock:
            resident = sorted(n for n, e in self.entries.items() if e.slot is not None)
            return resident, sum(p.slots for p in self.pools) - len(self.slot_owner)

    @property
    def slots_in_use(self) -> int:
        """Occupied slots: the resident adapters plus detached versions still finishing their requests."""
        with self._lock:
            return len(self.slot_owner)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
