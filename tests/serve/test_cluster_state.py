"""The cluster's pure parts: the adapter table, the sync plan a replica follows, a replica's routing view, and the
`serve run` arguments (no Ray cluster started here)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltafleet.errors import DeltafleetError
from deltafleet.serve.cluster.app import config_from_args
from deltafleet.serve.cluster.launch import local_defaults
from deltafleet.serve.cluster.state import AdapterTable, Entry, RoutingStats, plan_sync, view
from deltafleet.serve.routing import route_affinity

names = st.sampled_from(["a", "b", "c", "d", "e"])
tables = st.dictionaries(names, st.builds(Entry, st.sampled_from(["p", "q"]), st.integers(0, 2)), max_size=5)


@given(tables, tables)
def test_plan_sync_turns_any_table_into_any_other(have, want):
    steps = plan_sync(have, want)
    state = dict(have)
    for step in steps:
        if step.op == "remove":
            del state[step.name]
        else:
            assert (step.name in state) == (step.op == "replace")
            state[step.name] = step.entry
    assert state == want
    ops = [s.op for s in steps]
    assert ops == sorted(ops, key=["remove", "replace", "add"].index)  # removals first: their slots are free
    assert plan_sync(want, want) == []


def test_table_versions_grow_and_refuse_what_is_not_there(tmp_path):
    for d in ("x", "y", ".hidden"):
        (tmp_path / d).mkdir()
    (tmp_path / "file.txt").write_text("not an adapter directory")
    t = AdapterTable.scan(tmp_path)
    assert t.snapshot() == (0, {"x": Entry("x"), "y": Entry("y")})
    assert t.add("z", "x") == 1
    with pytest.raises(KeyError):
        t.add("z", "y")
    assert t.replace("z", "y") == 2 and t.entries["z"] == Entry("y", 1)
    assert t.remove("x") == 3
    with pytest.raises(KeyError):
        t.remove("x")
    with pytest.raises(KeyError):
        t.replace("x", "x")
    assert t.version == 3 and AdapterTable.scan(None).snapshot() == (0, {})


def test_routing_stats_round_trip_and_views():
    s = RoutingStats(("t1",), ("t2",), 3, 5, 7)
    assert RoutingStats.from_dict(s.as_dict()) == s and RoutingStats.from_dict(None) == RoutingStats()
    assert view(s, "t1", False, None).holds and view(s, None, False, None).holds  # the base: everywhere
    assert not view(s, "t2", False, None).holds  # in host memory only: not yet in a slot
    assert view(s, "t2", True, None).holds  # just sent there: it is loading it
    assert view(s, "t1", False, 9).load == 9 and view(s, "t1", False, None).load == 5


def test_affinity_over_replica_views_prefers_the_holder_then_room_then_load():
    rng = random.Random(0)
    stats = [RoutingStats((), (), 0, 1), RoutingStats(("t",), (), 0, 3), RoutingStats((), (), 2, 2)]
    assert route_affinity([view(s, "t", False, None) for s in stats], rng, 4) == 1
    assert route_affinity([view(s, "u", False, None) for s in stats], rng, 4) == 2  # room to load it
    assert route_affinity([view(s, "t", False, None) for s in stats], rng, 2) == 2  # holder 2 over: spill to room


def test_serve_run_arguments_are_typed_and_checked(tmp_path):
    cfg = config_from_args({"base": "smollm2-135m", "replicas": "3", "stats_period_s": "0.5", "max_batch": "8",
                            "dtype": "float32", "prepack": "false", "threads": "2", "adapter_dtype": "none"})
    assert cfg.replicas == 3 and cfg.stats_period_s == 0.5 and cfg.spec.threads == 2
    engine = cfg.spec.engine_config()
    assert engine.max_batch == 8 and engine.prepack is False and engine.dtype == "float32"
    assert engine.adapter_dtype is None
    for bad, rule in (({"replicas": "2"}, "base="), ({"base": "m", "replicas": "two"}, "replicas='two'"),
                      ({"base": "m", "max_btach": "8"}, "unknown argument 'max_btach'"),
                      ({"base": "m", "prepack": "maybe"}, "prepack='maybe'"),
                      ({"base": "m", "max_batch": "0"}, "max_batch")):
        with pytest.raises((DeltafleetError, ValueError), match=rule):
            config_from_args(bad)
    toml = tmp_path / "tenants.toml"
    toml.write_text('[[tenants]]\nname = "a"\napi_key = "sk-aaaaaaaaaaaaaaaa"\nadapters = ["a-*"]\n')
    assert config_from_args({"base": "m", "tenancy": str(toml)}).tenancy["tenants"][0]["name"] == "a"
    toml.write_text("[[tenants]]\nname = 3\n")
    with pytest.raises(DeltafleetError, match="tenants"):
        config_from_args({"base": "m", "tenancy": str(toml)})


def test_local_defaults_split_the_cores_between_replicas():
    cfg = config_from_args({"base": "m", "replicas": "4"})
    local = local_defaults(cfg, cores=2)
    assert local.spec.threads == 1 and local.cpus_per_replica == 0.5
    assert local_defaults(config_from_args({"base": "m", "replicas": "2"}), cores=16).spec.threads == 8


def test_the_serve_config_file_builds_its_application_config():
    import yaml

    from deltafleet.serve.cluster import app as cluster_app

    path = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve-config.yaml"
    application = yaml.safe_load(path.read_text())["applications"][0]
    module, name = application["import_path"].split(":")
    assert module == cluster_app.__name__ and callable(getattr(cluster_app, name))
    cfg = config_from_args(application["args"])
    assert cfg.replicas == 2 and cfg.spec.threads == 8 and cfg.spec.engine_config().max_batch == 32
