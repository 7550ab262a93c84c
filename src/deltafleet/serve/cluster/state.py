"""The cluster's shared state, as pure data (no Ray): the adapter table every replica follows, the plan that brings
one replica's adapters in line with it, and a replica's routing view of a tenant.

The table names each adapter's directory relative to the shared adapters root and a revision that grows when its
weights are replaced; the table's version grows with every change. A replica remembers the version it applied and
re-reads the table when a request or the registry shows a newer one (`plan_sync` turns the difference into engine
calls: removals first, so their slots are free for what follows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deltafleet.serve.routing import ReplicaView


@dataclass(frozen=True)
class Entry:
    path: str  # the adapter directory, relative to the adapters root
    revision: int = 0  # grows with every replace


@dataclass
class AdapterTable:
    """The adapters the cluster serves (name -> Entry) and a version that grows with every change."""

    entries: dict[str, Entry] = field(default_factory=dict)
    version: int = 0

    @classmethod
    def scan(cls, root: str | Path | None) -> AdapterTable:
        """One adapter per subdirectory of `root` (not starting with '.'), named after it, as `Engine` scans."""
        if root is None:
            return cls()
        subs = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
        return cls({name: Entry(name) for name in subs})

    def add(self, name: str, path: str) -> int:
        if name in self.entries:
            raise KeyError(name)
        self.entries[name] = Entry(path)
        return self._changed()

    def replace(self, name: str, path: str) -> int:
        old = self.entries[name]  # KeyError: not registered
        self.entries[name] = Entry(path, old.revision + 1)
        return self._changed()

    def remove(self, name: str) -> int:
        del self.entries[name]
        return self._changed()

    def _changed(self) -> int:
        self.version += 1
        return self.version

    def snapshot(self) -> tuple[int, dict[str, Entry]]:
        return self.version, dict(self.entries)


@dataclass(frozen=True)
class Step:
    op: str  # "remove", "replace" or "add"
    name: str
    entry: Entry | None = None


def plan_sync(have: dict[str, Entry], want: dict[str, Entry]) -> list[Step]:
    """The engine calls that turn a replica's adapters `have` into the table's `want`: removals, then replacements
    (a new path or revision), then additions, each in name order."""
    steps = [Step("remove", n) for n in sorted(have.keys() - want.keys())]
    steps += [Step("replace", n, want[n]) for n in sorted(have.keys() & want.keys()) if have[n] != want[n]]
    steps += [Step("add", n, want[n]) for n in sorted(want.keys() - have.keys())]
    return steps


@dataclass(frozen=True)
class RoutingStats:
    """What a replica tells the router (Ray Serve's `record_routing_stats`): adapters in a slot, adapters loaded or
    loading into host memory, free slots, requests running + waiting, and the table version it applied."""

    resident: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    free_slots: int = 0
    load: int = 0
    version: int = -1

    def as_dict(self) -> dict:
        return {"resident": list(self.resident), "host": list(self.host), "free_slots": self.free_slots,
                "load": self.load, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict | None) -> RoutingStats:
        d = d or {}
        return cls(tuple(d.get("resident", ())), tuple(d.get("host", ())), int(d.get("free_slots", 0)),
                   int(d.get("load", 0)), int(d.get("version", -1)))


def view(stats: RoutingStats, tenant: str | None, recently_sent: bool, queue_len: int | None) -> ReplicaView:
    """A replica as `routing.ROUTERS` see it for `tenant` (None: the base model, held everywhere). It holds the
    tenant if the tenant is resident there, or was just sent there (its stats are a period old: the request is
    loading it now). Load: the router's own count of requests there when it has one, else the replica's."""
    holds = tenant is None or recently_sent or tenant in stats.resident
    return ReplicaView(holds, stats.free_slots, stats.load if queue_len is None else queue_len)
