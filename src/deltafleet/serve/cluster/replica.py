"""The Ray Serve deployments behind the ingress: `EngineReplica` (one deltafleet engine: its own slots and host
cache) and `Registry` (the cluster's adapter table and the replicas' latest reports).

Values crossing processes are plain dataclasses: a request is a `gateway.Generation`, its answer the events
`EngineReplica.generate` yields: first `Accepted` (naming the replica) or `Refusal` (the gateway error's class
name, message and parameter), then `gateway.Event`s.

Lifecycle: the ingress changes the registry's table, then tags every request with the table version it knows.
A replica applies the table (`state.plan_sync`) before serving a request with a newer version, and whenever its
periodic report (Ray Serve's `record_routing_stats`) learns of one, so a load, unload or replace reaches every
replica, including one restarted by Ray (it starts from the adapters root's subdirectories, then applies the
table).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass

import torch
from ray import serve

from deltafleet.serve.cluster.state import AdapterTable, Entry, RoutingStats, plan_sync
from deltafleet.serve.engine import EngineConfig
from deltafleet.serve.engine.adapters import AdapterState
from deltafleet.serve.http.engine_gateway import EngineGateway
from deltafleet.serve.http.gateway import GatewayError, Generation

log = logging.getLogger("deltafleet.serve")
REPORT_TTL_S = 10.0  # a replica that has not reported for this long is left out of listings and metrics


@dataclass(frozen=True)
class ClusterSpec:
    """What every replica is built from. `engine`: `EngineConfig` fields; `threads`: torch threads per engine
    replica (None: torch's default, every core; set it when replicas share a machine)."""

    base: str
    adapters_root: str | None = None
    model_name: str | None = None
    engine: tuple[tuple[str, object], ...] = ()
    threads: int | None = None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**dict(self.engine))


@dataclass(frozen=True)
class Accepted:
    replica: str


@dataclass(frozen=True)
class Refusal:
    error: str  # the GatewayError subclass's name
    message: str
    param: str | None = None


def refusal(e: GatewayError) -> Refusal:
    return Refusal(type(e).__name__, e.message, e.param)


def replica_name() -> str:
    """This Serve replica's label: `engine-<rank>` where Ray Serve gives ranks, else its unique id."""
    ctx = serve.get_replica_context()
    rank = getattr(ctx.rank, "rank", ctx.rank)
    return f"{ctx.replica_id.deployment_id.name}-{rank}" if isinstance(rank, int) else ctx.replica_id.unique_id


class Registry:
    """The adapter table (initially the adapters root's subdirectories) and each replica's latest report."""

    def __init__(self, adapters_root: str | None):
        self.table = AdapterTable.scan(adapters_root)
        self.reports: dict[str, tuple[float, dict, list[dict]]] = {}

    def snapshot(self) -> tuple[int, dict[str, Entry]]:
        return self.table.snapshot()

    def add(self, name: str, path: str) -> int | None:
        """The new version, or None when `name` is taken."""
        try:
            return self.table.add(name, path)
        except KeyError:
            return None

    def replace(self, name: str, path: str) -> int | None:
        try:
            return self.table.replace(name, path)
        except KeyError:
            return None

    def remove(self, name: str) -> int | None:
        try:
            return self.table.remove(name)
        except KeyError:
            return None

    def report(self, replica: str, stats: dict, adapters: list[dict]) -> int:
        """A replica's engine stats and adapter listing; returns the table version."""
        self.reports[replica] = (time.monotonic(), stats, adapters)
        return self.table.version

    def reported(self) -> dict[str, tuple[dict, list[dict]]]:
        """The reports of the replicas heard from within `REPORT_TTL_S`."""
        now = time.monotonic()
        return {r: (s, a) for r, (t, s, a) in sorted(self.reports.items()) if now - t < REPORT_TTL_S}


class EngineReplica:
    def __init__(self, spec: ClusterSpec, registry):
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.name = replica_name()
        self.registry = registry
        self.gateway = EngineGateway.from_pretrained(spec.base, spec.adapters_root, spec.engine_config(),
                                                     spec.model_name)
        self.applied = {n: Entry(n) for n in self.gateway.adapter_names()}  # what the engine has (the root's)
        self.version = -1  # the table version applied; -1: not yet read
        self._sync_lock = asyncio.Lock()
        log.info("engine replica %s ready: %d adapters", self.name, len(self.applied))

    # ------------------------------------------------------------------ requests
    async def generate(self, generation: Generation, version: int):
        """`Accepted` or `Refusal`, then the request's `Event`s. Cancelling the stream aborts the request."""
        await self.sync(version)
        try:
            stream = self.gateway.submit(generation)
        except GatewayError as e:
            yield refusal(e)
            return
        yield Accepted(self.name)
        try:
            async for event in stream:
                yield event
        finally:
            stream.abort()  # a no-op once finished; frees the slot when the client went away

    async def check_adapter(self, name: str, path: str) -> Refusal | None:
        """Whether `path` (relative to the adapters root) may be registered as `name` (the server's rules)."""
        try:
            await asyncio.to_thread(self.gateway.adapter_dir, name, path)
        except GatewayError as e:
            return refusal(e)
        return None

    async def try_replace(self, name: str, path: str) -> Refusal | None:
        """Read and check the new weights by swapping them in here (the old stay if they fail)."""
        await self.sync(0)
        try:
            await asyncio.to_thread(self.gateway.replace_adapter, name, path)
        except GatewayError as e:
            return refusal(e)
        return None

    # ------------------------------------------------------------------ the table
    async def sync(self, version: int) -> None:
        """Apply the registry's table if it is newer than what this replica applied (or never read)."""
        if version <= self.version and self.version >= 0:
            return
        async with self._sync_lock:
            if version <= self.version and self.version >= 0:
                return
            latest, want = await self.registry.snapshot.remote()
            for step in plan_sync(self.applied, want):
                try:
                    if step.op == "remove":
                        await asyncio.to_thread(self.gateway.unload_adapter, step.name)
                    elif step.op == "replace":
                        await asyncio.to_thread(self.gateway.replace_adapter, step.name, step.entry.path)
                    else:
                        await asyncio.to_thread(self.gateway.load_adapter, step.name, step.entry.path)
                except GatewayError as e:  # one adapter's failure is that adapter's: log it, apply the rest
                    log.error("replica %s: %s %s failed: %s", self.name, step.op, step.name, e.message)
            self.applied, self.version = want, latest

    def routing_stats(self) -> RoutingStats:
        resident, free = self.gateway.engine.adapters.residency()
        host = tuple(a.name for a in self.gateway.adapters()
                     if a.state in (AdapterState.HOST_MEMORY, AdapterState.LOADING))
        s = self.gateway.stats()
        return RoutingStats(tuple(resident), host, free, s["waiting"] + s["running"], self.version)

    async def record_routing_stats(self) -> dict:
        """Ray Serve asks every `request_routing_stats_period_s`: report to the registry, catch up with its table,
        return what the router reads."""
        listing = [asdict(a) | {"state": str(a.state)} for a in self.gateway.adapters()]
        stats = self.gateway.stats() | {"pid": os.getpid()}
        version = await self.registry.report.remote(self.name, stats, listing)
        await self.sync(version)
        return self.routing_stats().as_dict()

    def check_health(self) -> None:
        if not self.gateway.engine.alive:
            raise RuntimeError(f"replica {self.name}: the engine loop has stopped")

    def __del__(self):
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.shutdown(5.0)
