"""Ray Serve request router of the engine deployment: adapter affinity (`routing.route_affinity`, llm-d's scorer).

Ray Serve calls `choose_replicas` for each request with the running replicas; the request's tenant is its
multiplexed model id (the ingress sets it with `handle.options(multiplexed_model_id=...)`). Each replica's
`RoutingStats` arrive through Ray Serve's `record_routing_stats` every `request_routing_stats_period_s`; a
tenant just sent to a replica counts as held there for `RECENT_S` (long enough for the next stats to show it), so
a burst of requests for a cold tenant lands on one replica instead of loading it everywhere. The affinity choice is
the first rank; the other replicas follow by load (Ray Serve moves down the ranks when a replica is at its
`max_ongoing_requests`).

Ray Serve's own multiplexing router (`@serve.multiplexed`) does not fit as it is: it counts models per replica
against one cap, while an engine's slots come in pools per adapter kind and its host cache is bounded in bytes,
and it reports what its LRU holds, not what is resident in a slot. We keep its request tagging and replace the
policy.
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from deltafleet.serve.cluster.state import RoutingStats, view
from deltafleet.serve.routing import ROUTERS

RECENT_S = 2.0


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, policy: str = "affinity", spill: int = 16, seed: int = 0, **_) -> None:
        self.policy, self.spill = ROUTERS.get(policy), spill
        self.rng = random.Random(seed)
        self.sent: dict[tuple[str, object], float] = {}  # (tenant, replica id) -> when last routed there

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if not hasattr(self, "policy"):
            self.initialize_state()
        tenant = pending_request.metadata.multiplexed_model_id or None if pending_request is not None else None
        now = time.monotonic()
        views = [view(RoutingStats.from_dict(r.routing_stats), tenant,
                      now - self.sent.get((tenant, r.replica_id), -1e9) < RECENT_S,
                      self.replica_queue_len_cache.get(r.replica_id)) for r in candidate_replicas]
        best = self.policy(views, self.rng, self.spill)
        rest = sorted((i for i in range(len(views)) if i != best), key=lambda i: (views[i].load, i))
        return [[candidate_replicas[best]], [candidate_replicas[i] for i in rest]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        tenant = pending_request.metadata.multiplexed_model_id
        if tenant:
            self.sent[(tenant, replica_id)] = time.monotonic()
            if len(self.sent) > 4096:  # forget the stale ones
                cutoff = time.monotonic() - RECENT_S
                self.sent = {k: t for k, t in self.sent.items() if t >= cutoff}
