"""Start and stop the Ray Serve application: on a Ray cluster already running (`address`, or `RAY_ADDRESS`), or on
a local one started here (one node, a small object store; the engine replicas share this machine's cores).

`deltafleet serve --ray`, `deltafleet serve-demo --ray` and the tests start it through `start`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import ray
from ray import serve

from deltafleet.errors import DeltafleetError
from deltafleet.serve.cluster.app import ClusterConfig, build

APP = "deltafleet"
logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines on the driver repeat what we print
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # requests and events are small; Ray's default takes 30% of memory


def local_defaults(config: ClusterConfig, cores: int | None = None) -> ClusterConfig:
    """On one machine, split its cores between the engine replicas: torch threads and Ray CPUs per replica."""
    cores = cores or os.cpu_count() or 1
    threads = config.spec.threads or max(1, cores // config.replicas)
    return replace(config, spec=replace(config.spec, threads=threads),
                   cpus_per_replica=min(config.cpus_per_replica, cores / config.replicas))


@dataclass(frozen=True)
class Launched:
    url: str  # the ingress
    local: bool  # a Ray cluster started by `start` (stopped with the application)

    def stop(self) -> None:
        """Delete the application; on a local cluster, stop Serve and Ray too."""
        try:
            if self.local:
                serve.shutdown()
            else:
                serve.delete(APP)
        finally:
            ray.shutdown()


def start(config: ClusterConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          timeout: float = 300.0) -> Launched:
    """Run the application and wait until every engine replica reports."""
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to anyscale from a server
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    else:
        config = local_defaults(config)
        loopback = host in ("127.0.0.1", "localhost", "::1")
        ray.init(num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                 configure_logging=False, log_to_driver=False, **({"_node_ip_address": "127.0.0.1"} if loopback
                                                                   else {}))
    launched = Launched(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", not address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(config), name=APP, route_prefix="/")
        wait_for_replicas(config.replicas, timeout)
    except Exception as e:  # noqa: BLE001 (Ray's deployment failures have many classes: report, clean up)
        launched.stop()
        if isinstance(e, DeltafleetError):
            raise
        raise DeltafleetError(f"the Ray Serve application did not start: {type(e).__name__}: "
                              f"{str(e).strip()[:2000]}") from None
    return launched


def reporting_replicas() -> dict[str, dict]:
    """Engine stats of the replicas that reported recently, by replica name."""
    registry = serve.get_deployment_handle("registry", app_name=APP)
    return {name: stats for name, (stats, _) in registry.reported.remote().result().items()}


def wait_for_replicas(n: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while len(reporting_replicas()) < n:
        if time.monotonic() > end:
            raise DeltafleetError(f"only {len(reporting_replicas())} of {n} engine replicas reported within "
                                  f"{timeout:.0f} s (see `ray status` and the replicas' logs)")
        time.sleep(0.25)
