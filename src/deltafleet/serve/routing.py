"""Which replica of the base serves a tenant's request: routing policies over a view of each replica (pure; no
engine, no Ray). The scale-out ingress and the routing simulation (`deltafleet bench route`) both call them.

A replica is seen through `ReplicaView`: whether the tenant is resident there (or already loading or queued
there: it will be resident when the request runs), how many adapter slots are free, and its load (requests
running plus waiting). Policies (registry `ROUTERS`):
- `random`: uniform over replicas;
- `least_loaded`: the smallest load (ties by lowest index);
- `affinity`: the scorer of llm-d's inference gateway, as its documentation describes it: prefer a replica where the
  tenant is resident, then one with a free slot to load it, then the least loaded. A hot tenant spills: when the
  least loaded replica holding it carries `spill` more requests than the least loaded replica overall, the
  request goes on as if the tenant were resident nowhere, so heavy traffic spreads over several replicas.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deltafleet.registry import Registry


@dataclass(frozen=True)
class ReplicaView:
    holds: bool  # the tenant is resident, loading or queued on this replica
    free_slots: int  # adapter slots holding no tenant
    load: int  # requests running + waiting


Router = Callable[[Sequence[ReplicaView], random.Random, int], int]  # (views, rng, spill) -> replica index
ROUTERS: Registry[Router] = Registry("router")


def _least(views: Sequence[ReplicaView], among: Sequence[int]) -> int:
    return min(among, key=lambda i: (views[i].load, i))


def route_random(views: Sequence[ReplicaView], rng: random.Random, spill: int) -> int:
    return rng.randrange(len(views))


def route_least_loaded(views: Sequence[ReplicaView], rng: random.Random, spill: int) -> int:
    return _least(views, range(len(views)))


def route_affinity(views: Sequence[ReplicaView], rng: random.Random, spill: int) -> int:
    everyone = range(len(views))
    lightest = views[_least(views, everyone)].load
    holding = [i for i in everyone if views[i].holds]
    if holding:
        best = _least(views, holding)
        if views[best].load - lightest < spill:
            return best
    with_room = [i for i in everyone if views[i].free_slots > 0]
    if with_room:
        best = _least(views, with_room)
        if views[best].load - lightest < spill:
            return best
    return _least(views, everyone)


ROUTERS.register("random", route_random)
ROUTERS.register("least_loaded", route_least_loaded)
ROUTERS.register("affinity", route_affinity)
