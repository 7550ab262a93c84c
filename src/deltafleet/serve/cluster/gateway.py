"""`Gateway` over the Ray Serve engine deployment: what the ingress's unchanged FastAPI app talks to.

The ingress tokenizes (`http.prompts`, no engine needed) and sends token ids; each request goes through the
engine deployment's handle tagged with its adapter as Ray Serve's multiplexed model id, so the deployment's
router (`cluster.router`) picks the replica by adapter affinity. A request's stream starts with the replica's
`Accepted` or `Refusal`: a refusal becomes the gateway error it names (so a full queue on a replica is still a
429 before any byte is sent), and a replica that dies before accepting is retried on another (Ray Serve routes
around a dead replica): only requests a replica had accepted are lost when it dies, each ending with an error
event.

Adapter names are the registry's table, cached here and refreshed every `REFRESH_S` and after each admin call;
every request carries the table version this ingress knows, so a replica that has not applied it yet does so
before running the request (requests after a replace get the new weights on every replica).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

from ray.exceptions import RayError

from deltafleet.serve.cluster.replica import Accepted, Refusal
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

log = logging.getLogger("deltafleet.serve")
REFRESH_S = 1.0
START_ATTEMPTS = 3  # tries of a request whose replica died before accepting it
ERRORS: dict[str, type[GatewayError]] = {c.__name__: c for c in (
    InvalidRequest, PromptTooLong, UnknownModel, QueueFull, ShuttingDown, AdapterConflict, GatewayError)}
STATE_ORDER = (AdapterState.RESIDENT, AdapterState.HOST_MEMORY, AdapterState.LOADING, AdapterState.ON_DISK,
               AdapterState.FAILED)  # an adapter's cluster-wide state: the first any replica reports


def raise_refusal(r: Refusal) -> None:
    raise ERRORS.get(r.error, GatewayError)(r.message, r.param)


class ClusterStream:
    """A request sent to the engine deployment; `start` waits for the replica's answer (retrying a dead one)."""

    def __init__(self, send):
        self._send = send  # () -> DeploymentResponseGenerator
        self._responses = None
        self.replica = ""
        self._finished = False

    async def start(self) -> None:
        for attempt in range(START_ATTEMPTS):
            self._responses = self._send()
            try:
                first = await self._responses.__anext__()
            except RayError as e:
                if attempt == START_ATTEMPTS - 1:
                    raise GatewayError(f"no engine replica could take the request ({type(e).__name__})") from None
                log.warning("an engine replica failed before accepting a request (%s); retrying", type(e).__name__)
                continue
            if isinstance(first, Refusal):
                self._finished = True
                raise_refusal(first)
            self.replica = first.replica if isinstance(first, Accepted) else ""
            return

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for event in self._responses:
                if event.finish_reason is not None:
                    self._finished = True
                yield event
        except RayError as e:  # the replica died with the request in flight
            self._finished = True
            yield Event("", "error", error=f"engine replica {self.replica} failed: {type(e).__name__}: {e}")

    def abort(self) -> None:
        if self._responses is not None and not self._finished:
            self._responses.cancel()
        self._finished = True

    @property
    def finished(self) -> bool:
        return self._finished


class ClusterGateway:
    def __init__(self, engine, registry, prompts: Prompts, model_name: str):
        self.engine, self.registry = engine, registry  # Ray Serve deployment handles
        self.prompts = prompts
        self.model_name = model_name
        self.max_model_len = prompts.max_model_len
        self._draining = False
        self._version, self._names = -1, []
        self._stop = threading.Event()
        self._loaded = threading.Event()  # the table was read once
        self._refresher = threading.Thread(target=self._refresh_loop, name="deltafleet-table", daemon=True)
        self._refresher.start()

    # ------------------------------------------------------------------ the table
    def refresh(self) -> None:
        version, entries = self.registry.snapshot.remote().result()
        if version >= self._version:
            self._version, self._names = version, sorted(entries)
        self._loaded.set()

    def wait_loaded(self, timeout: float) -> bool:
        """Block until the refresher thread has read the table once (so no request sees an empty adapter list as
        the server starts); False after `timeout` seconds."""
        return self._loaded.wait(timeout)

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except RayError as e:  # the registry is restarting: keep the last table
                log.warning("adapter table refresh failed: %s", type(e).__name__)
            self._stop.wait(REFRESH_S)

    # ------------------------------------------------------------------ prompts
    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.prompts.chat_prompt(messages)

    # ------------------------------------------------------------------ generation
    def submit(self, g: Generation) -> ClusterStream:
        if self._draining:
            raise ShuttingDown("the server is shutting down")
        if g.adapter is not None and g.adapter not in self._names:
            raise UnknownModel(f"adapter {g.adapter!r} not found", "model")
        version = self._version
        handle = self.engine.options(stream=True, multiplexed_model_id=g.adapter or "")
        return ClusterStream(lambda: handle.generate.remote(g, version))

    # ------------------------------------------------------------------ adapters
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def adapters(self) -> list[AdapterInfo]:
        self.refresh()
        reports = self.registry.reported.remote().result()
        rows: dict[str, list[tuple[str, dict]]] = {n: [] for n in self._names}
        for replica, (_, listing) in reports.items():
            for row in listing:
                if row["name"] in rows:
                    rows[row["name"]].append((replica, row))
        out = []
        for name, seen in rows.items():
            states = {replica: AdapterState(row["state"]) for replica, row in seen}
            state = min(states.values(), key=STATE_ORDER.index, default=AdapterState.ON_DISK)
            info = next((row for _, row in seen if row["kind"]), {})
            error = next((row["error"] for _, row in seen if row["error"]), None)
            out.append(AdapterInfo(name, state, info.get("kind"), info.get("detail"), info.get("bytes"), error,
                                   {"replicas": {r: str(s) for r, s in sorted(states.items())}}))
        return out

    def load_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        refused = self.engine.check_adapter.remote(name, relative_path).result()
        if refused is not None:
            raise_refusal(refused)
        version = self.registry.add.remote(name, relative_path).result()
        if version is None:
            raise AdapterConflict(f"adapter {name!r} is already loaded; delete it first", "name")
        self.refresh()
        return AdapterInfo(name, AdapterState.ON_DISK, extra={"replicas": {}})

    def replace_adapter(self, name: str, relative_path: str) -> AdapterInfo:
        if name not in self._names:
            raise UnknownModel(f"adapter {name!r} not found", "name")
        refused = self.engine.options(multiplexed_model_id=name).try_replace.remote(name, relative_path).result()
        if refused is not None:
            raise_refusal(refused)
        if self.registry.replace.remote(name, relative_path).result() is None:
            raise UnknownModel(f"adapter {name!r} not found", "name")
        self.refresh()
        return next(a for a in self.adapters() if a.name == name)

    def unload_adapter(self, name: str) -> None:
        if self.registry.remove.remote(name).result() is None:
            raise UnknownModel(f"adapter {name!r} not found", "name")
        self.refresh()

    # ------------------------------------------------------------------ state
    def replica_stats(self) -> dict[str, dict]:
        return {replica: stats for replica, (stats, _) in self.registry.reported.remote().result().items()}

    def stats(self) -> dict:
        """The replicas' stats summed (the gauges and counters add up across replicas)."""
        total: dict = {"adapter_cache": {}}
        for stats in self.replica_stats().values():
            for k, v in stats.items():
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        total["adapter_cache"][kk] = total["adapter_cache"].get(kk, 0) + vv
                elif isinstance(v, int | float) and k != "pid":
                    total[k] = total.get(k, 0) + v
        return total

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_shutdown(self) -> None:
        self._draining = True

    def shutdown(self, deadline: float) -> None:
        """The ingress stops taking requests; the engine replicas drain when Ray Serve stops them."""
        self._draining = True
        self._stop.set()
