"""The Ray Serve application: one OpenAI-compatible ingress, N engine replicas of the base, one adapter registry.

    ingress (FastAPI app of `serve.http.app`, unchanged)  --handle, multiplexed id = adapter-->  engine x N
         \\--> registry (adapter table, replicas' reports) <-- engines report every period and follow the table

`build(config)` returns the bound application for `serve.run` (`deltafleet serve --ray` does that);
`app_builder(args)` is the same for `serve run deltafleet.serve.cluster.app:app_builder key=value ...` and Serve
config files (`deploy/ray/serve-config.yaml`). Every replica reads the base model and the adapters root from its
own file system: on a multi-node cluster both must be at the same path on every node (README: "Scale-out on Ray
Serve").
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import MISSING, dataclass, fields

from ray import serve
from ray.serve.config import RequestRouterConfig

from deltafleet.errors import DeltafleetError
from deltafleet.models.loading import load_tokenizer, resolve_base
from deltafleet.serve.cluster.gateway import ClusterGateway
from deltafleet.serve.cluster.replica import ClusterSpec, EngineReplica, Registry
from deltafleet.serve.cluster.router import AdapterAffinityRouter
from deltafleet.serve.engine import EngineConfig
from deltafleet.serve.http.app import create_app
from deltafleet.serve.http.engine_gateway import default_model_name
from deltafleet.serve.http.metrics import Metrics
from deltafleet.serve.http.middleware import DEFAULT_MAX_BODY_BYTES
from deltafleet.serve.http.prompts import Prompts
from deltafleet.serve.http.tenancy import Tenancy

log = logging.getLogger("deltafleet.serve")
TABLE_WAIT_S = 60.0


@dataclass(frozen=True)
class ClusterConfig:
    """
    replicas: engine replicas of the base (each its own engine, slots and host cache).
    cpus_per_replica: Ray CPUs each engine replica reserves (0: no reservation, for a shared test machine).
    stats_period_s: how often each replica reports residency and load to the router and the registry.
    policy, spill: the router's policy (`routing.ROUTERS`) and how many requests more than the least loaded
        replica a replica holding the tenant may carry before the tenant spreads to another.
    max_ongoing_requests: requests Ray Serve lets into one engine replica at once (the rest wait at the router;
        the engine's own queue bound answers 429 beyond its `max_queue`).
    """

    spec: ClusterSpec
    replicas: int = 2
    cpus_per_replica: float = 1.0
    stats_period_s: float = 1.0
    policy: str = "affinity"
    spill: int = 16
    max_ongoing_requests: int = 64
    tenancy: dict | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class Ingress:
    """The HTTP entry point: `create_app` over a `ClusterGateway` (Ray Serve builds the ASGI app after __init__)."""

    def __init__(self, config: ClusterConfig, engine, registry):
        spec = config.spec
        self.config = config
        prompts = Prompts(load_tokenizer(resolve_base(spec.base)), spec.engine_config().max_model_len)
        self.gateway = ClusterGateway(engine, registry, prompts, spec.model_name or default_model_name(spec.base))
        if not self.gateway.wait_loaded(TABLE_WAIT_S):  # the read runs on the gateway's thread, not this loop
            log.warning("the adapter table was not read within %.0f s; adapters appear once it is", TABLE_WAIT_S)

    def __serve_build_asgi_app__(self):
        tenancy = Tenancy.from_dict(self.config.tenancy) if self.config.tenancy else Tenancy()
        return create_app(self.gateway, tenancy, Metrics(per_replica=True), self.config.max_body_bytes)


def build(config: ClusterConfig):
    """The application, bound: `serve.run(build(config), route_prefix="/")`."""
    registry = serve.deployment(Registry, name="registry", ray_actor_options={"num_cpus": 0},
                                max_ongoing_requests=1000).bind(config.spec.adapters_root)
    router = RequestRouterConfig(request_router_class=AdapterAffinityRouter,
                                 request_router_kwargs={"policy": config.policy, "spill": config.spill},
                                 request_routing_stats_period_s=config.stats_period_s)
    engine = serve.deployment(EngineReplica, name="engine", num_replicas=config.replicas,
                              ray_actor_options={"num_cpus": config.cpus_per_replica},
                              max_ongoing_requests=config.max_ongoing_requests, request_router_config=router,
                              health_check_period_s=2.0).bind(config.spec, registry)
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000)
    return ingress.bind(config, engine, registry)


def _coerce(text, default, name: str):
    """A `serve run` argument (a string, or a YAML scalar from a config file) as the type of the field's default."""
    if not isinstance(text, str) or isinstance(default, str):
        return text
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(default, int | float):
            return type(default)(text)
        for cast in (int, float):  # a field whose default is None
            try:
                return cast(text)
            except ValueError:
                pass
        return None if text.lower() in ("none", "null") else text
    except ValueError:
        raise DeltafleetError(f"{name}={text!r}: expected {type(default).__name__}") from None


def _defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not MISSING else None) for f in fields(cls)}


def config_from_args(args: dict) -> ClusterConfig:
    """ClusterSpec fields (`base`, `adapters_root`, `model_name`, `threads`), ClusterConfig fields (`replicas`,
    `policy`, ...; `tenancy` is a TOML file's path) and `EngineConfig` fields, by name."""
    args = dict(args)
    spec_d, config_d, engine_d = _defaults(ClusterSpec), _defaults(ClusterConfig), _defaults(EngineConfig)
    if "base" not in args:
        raise DeltafleetError("base=...: the base model (an embedded name or a checkpoint directory) is required")
    tenancy = None
    if args.get("tenancy"):
        Tenancy.from_file(args["tenancy"])  # refuse a bad file with its rule before any replica starts
        with open(args.pop("tenancy"), "rb") as f:
            tenancy = tomllib.load(f)
    unknown = sorted(set(args) - set(spec_d) - set(config_d) - set(engine_d) - {"engine", "spec"})
    if unknown:
        raise DeltafleetError(f"unknown argument {unknown[0]!r}: expected a field of ClusterSpec, ClusterConfig or "
                              f"EngineConfig")
    spec = ClusterSpec(**{k: _coerce(v, spec_d[k], k) for k, v in args.items() if k in spec_d and k != "engine"},
                       engine=tuple((k, _coerce(v, engine_d[k], k)) for k, v in sorted(args.items())
                                    if k in engine_d))
    spec.engine_config()  # an invalid engine field fails here, not in every replica
    return ClusterConfig(spec, tenancy=tenancy, **{k: _coerce(v, config_d[k], k) for k, v in args.items()
                                                   if k in config_d and k not in ("spec", "tenancy")})


def app_builder(args: dict):
    """For `serve run deltafleet.serve.cluster.app:app_builder base=smollm2-135m adapters_root=/shared/adapters
    replicas=2 dtype=bfloat16 ...`: ClusterSpec and ClusterConfig fields by name, every other key an
    `EngineConfig` field; values arrive as strings and are converted to the field's type."""
    return build(config_from_args(args))
