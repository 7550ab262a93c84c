"""The Grafana dashboard (deploy/grafana/deltafleet.json) imports cleanly: Grafana's import format (a datasource
input, unique panel ids, panels on the grid without overlap), every query parses as PromQL, and every series it
reads is one the server exposes (a single server here; the Ray test checks the ingress's per-replica series)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import promql_parser

from tests.serve_http.conftest import KEYS

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "deltafleet.json"
SERIES = re.compile(r"\b(deltafleet_[a-z_]+)\b")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(d: dict) -> list[str]:
    """The PromQL of every panel and variable (a variable's `label_values(selector, label)` is Grafana's: its
    selector is the PromQL)."""
    out = [t["expr"] for p in d["panels"] for t in p["targets"]]
    for v in d["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), *\w+\)", v["query"]["query"])
        assert m, v["query"]["query"]
        out.append(m.group(1))
    return out


def series_names(metrics_text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in metrics_text.splitlines()
            if line and not line.startswith("#")}


def check_series(d: dict, exposed: set[str]) -> None:
    used = {name for q in queries(d) for name in SERIES.findall(q)}
    assert used and used <= exposed, sorted(used - exposed)


def test_the_dashboard_has_grafanas_import_format():
    d = dashboard()
    inputs = {i["name"] for i in d["__inputs"] if i["type"] == "datasource" and i["pluginId"] == "prometheus"}
    assert inputs == {"DS_PROMETHEUS"} and d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in d["panels"]:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["type"] == "timeseries" and p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])


def test_every_query_parses_as_promql():
    for q in queries(dashboard()):
        promql_parser.parse(q.replace("$__rate_interval", "1m").replace("$replica", ".*"))


def test_every_series_the_dashboard_reads_is_exposed(live):
    live.client(KEYS["acme"]).completions.create(model="acme-lora", prompt="dash", max_tokens=3)
    text = httpx.get(f"{live.url}/metrics", headers={"Authorization": f"Bearer {KEYS['ops']}"}).text
    check_series(dashboard(), series_names(text))
