"""Grafana as provisioned from infra/grafana/, checked without a Grafana.

A dashboard that names a metric nobody exposes, a query Prometheus cannot parse or a
data source uid that is not provisioned shows an empty panel and no error anywhere:
these tests catch those. The queries are parsed by promtool (Prometheus' own parser),
as recording rules of a throwaway rule file.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.metric_names import EXPOSED, problems, series_names

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
GRAFANA_SERVICE = "grafana"

# Grafana's own variables, replaced by what they stand for before promtool parses a query.
_GRAFANA_INTERVAL = re.compile(r"\$__(?:rate_)?interval\b|\$\{__(?:rate_)?interval\}")
_TEMPLATE_VARIABLE = re.compile(r"\$\{?\w+\}?")
_LABEL_VALUES = re.compile(r"label_values\(\s*([^,)]+?)\s*,\s*\w+\s*\)")

Panel = dict[str, Any]


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} does not hold a mapping"
    return data


@pytest.fixture(scope="module")
def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")["services"]
    return services


@pytest.fixture(scope="module")
def datasources() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml")):
        found += load_yaml(path).get("datasources", [])
    return found


def dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a JSON object"
    return data


def panels(board: dict[str, Any]) -> list[Panel]:
    """Every panel, rows' nested ones included, rows themselves excluded."""
    found: list[Panel] = []
    for panel in board.get("panels", []):
        if panel.get("type") == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    found = [
        (f"panel {panel['title']!r} target {target.get('refId')}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query)
            # label_values(metric, label) is Grafana's, not PromQL: its selector is.
            match = _LABEL_VALUES.fullmatch(text.strip())
            found.append((f"variable ${variable['name']}", match.group(1) if match else text))
    return found


def as_promql(expr: str) -> str:
    return _TEMPLATE_VARIABLE.sub("x", _GRAFANA_INTERVAL.sub("1m", expr))


def test_there_is_a_conclave_dashboard() -> None:
    assert DASHBOARDS, "infra/grafana/dashboards holds no dashboard"
    titles = [dashboard(path).get("title") for path in DASHBOARDS]
    assert "Conclave" in titles
    uids = [dashboard(path).get("uid") for path in DASHBOARDS]
    assert all(uids), f"a dashboard has no uid: {uids}"
    assert len(set(uids)) == len(uids), f"dashboards share a uid: {uids}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_have_queries_unique_ids_and_do_not_overlap(path: Path) -> None:
    board = dashboard(path)
    every = [*board.get("panels", []), *panels(board)]
    ids = [panel.get("id") for panel in {id(p): p for p in every}.values()]
    assert len(set(ids)) == len(ids), f"{path.name}: panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"
        if panel.get("type") != "row":
            assert any(t.get("expr") for t in panel.get("targets", [])), (
                f"{panel['title']} queries nothing"
            )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_reads_only_what_conclave_exposes(path: Path) -> None:
    found = [
        f"{where} {problem}"
        for where, expr in queries(dashboard(path))
        for problem in problems(expr)
    ]
    assert not found, "\n".join(found)


def test_the_dashboards_show_every_exposed_metric() -> None:
    shown = {
        name for path in DASHBOARDS for _, e in queries(dashboard(path)) for name in series_names(e)
    }
    # A histogram is shown through its buckets; its _sum and _count add nothing.
    wanted = {name for name in EXPOSED if not name.endswith(("_sum", "_count"))}
    assert not wanted - shown, f"no panel shows {sorted(wanted - shown)}"


def test_prometheus_parses_every_dashboard_query(promtool_binary: Path, tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{n}", "expr": as_promql(expr)}
        for n, (_, expr) in enumerate(q for path in DASHBOARDS for q in queries(dashboard(path)))
    ]
    assert rules
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    proc = subprocess.run(
        [str(promtool_binary), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_broken_query_is_refused(promtool_binary: Path, tmp_path: Path) -> None:
    """The parse check bites: an unbalanced query fails it."""
    rule_file = tmp_path / "broken.yml"
    broken = {
        "record": "dashboard:broken",
        "expr": as_promql("sum by (pool (rate(x[$__interval]))"),
    }
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [broken]}]}))
    proc = subprocess.run(
        [str(promtool_binary), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_use_provisioned_data_sources(path: Path, datasources: list[dict[str, Any]]) -> None:
    uids = {source["uid"] for source in datasources}
    for panel in panels(dashboard(path)):
        for holder in (panel, *panel.get("targets", [])):
            source = holder.get("datasource")
            if isinstance(source, dict) and source.get("type") != "grafana":
                assert source.get("uid") in uids, (
                    f"{panel['title']} uses data source {source}, provisioned: {sorted(uids)}"
                )


def test_data_sources_point_at_compose_services(
    datasources: list[dict[str, Any]], compose_services: dict[str, Any]
) -> None:
    assert {"prometheus", "jaeger"} <= {source["type"] for source in datasources}
    for source in datasources:
        url = urlsplit(source["url"])
        service = compose_services.get(url.hostname or "")
        assert service is not None, f"{source['name']}: {url.hostname} is not a compose service"
        ports = {
            str(p).split(":")[-1] for p in [*service.get("expose", []), *service.get("ports", [])]
        }
        assert str(url.port) in ports, f"{source['name']}: {url.hostname} has no port {url.port}"


def test_grafana_service_mounts_what_provisioning_reads(compose_services: dict[str, Any]) -> None:
    service = compose_services[GRAFANA_SERVICE]
    mounts = {
        str(volume).split(":")[1]: str(volume).split(":")[0]
        for volume in service.get("volumes", [])
    }
    assert mounts.get("/etc/grafana/provisioning") == "./infra/grafana/provisioning"
    for path in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.y*ml")):
        for provider in load_yaml(path)["providers"]:
            inside = provider["options"]["path"]
            assert inside in mounts, f"provider {provider['name']} reads unmounted {inside}"
            assert (ROOT / mounts[inside]).resolve() == (GRAFANA / "dashboards").resolve()
    home = service.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        directory, _, name = home.rpartition("/")
        assert (ROOT / mounts[directory] / name).is_file(), f"home dashboard {home} is missing"
