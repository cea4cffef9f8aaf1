"""Dashboards as code: committed JSON matches the generator, holds the plan's panels, and reads
only metrics the services export (docs/sre/metrics.md) or the rules record."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mhv_tools import gen_dashboards, gen_rules
from mhv_tools.gen_dashboards import grafana_to_promql, load_dashboards, panel_queries
from tests.observability.contract import CONTRACT, series_names
from tests.observability.promql import metric_names
from tests.observability.tools import ROOT, RULES_DIR

# Series Prometheus itself provides.
BUILTIN = {"up", "ALERTS"}


def recorded_names() -> set[str]:
    """Every series name a recording rule writes."""
    names = set()
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


def rule_expressions() -> list[str]:
    """The expression of every rule."""
    exprs = []
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            exprs += [r["expr"] for r in group["rules"]]
    return exprs


def titles(board: dict[str, Any]) -> set[str]:
    """Titles of every panel, rows included."""
    return {p["title"] for p in gen_dashboards._walk_panels(board["panels"])}


def test_committed_dashboards_match_the_generator() -> None:
    assert gen_dashboards.main(["--check"]) == 0, "dashboards are stale: make generate"


def test_dashboards_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen_dashboards, "DASHBOARDS_DIR", tmp_path)
    assert gen_dashboards.main([]) == 0
    assert gen_dashboards.main(["--check"]) == 0
    edited = tmp_path / "slo.json"
    edited.write_text(edited.read_text().replace("slo_burn_rate", "slo_burn_rate * 2"))
    assert gen_dashboards.main(["--check"]) == 1
    assert gen_dashboards.main([]) == 0
    assert gen_dashboards.main(["--check"]) == 0


def test_the_plans_three_dashboards_and_their_panels() -> None:
    boards = load_dashboards()
    assert set(boards) == {"slo.json", "operational-health.json", "capacity-planning.json"}
    assert {b["uid"] for b in boards.values()} == {
        "mhv-slo",
        "mhv-operational-health",
        "mhv-capacity-planning",
    }
    slo_titles = {s.title for s in gen_rules.load_spec().slos}
    assert titles(boards["slo.json"]) >= slo_titles | {
        "Error budget remaining",
        "Burn rate (5m)",
        "SLO alerts firing",
    }
    assert titles(boards["operational-health.json"]) >= {
        "CreateTask latency",
        "Server failures by operation",
        "Errors by MHV code",
        "Connection pool: in use and size",
        "Active alerts",
    }
    assert titles(boards["capacity-planning.json"]) >= {
        "Tasks created per day",
        "Database size by schema",
        "Database size projected 30 days ahead",
        "Task query latency p95",
    }


def _queries_of(panel_title: str) -> list[str]:
    return [
        q.expr
        for board in load_dashboards().values()
        for q in panel_queries(board)
        if q.panel == panel_title
    ]


def test_panels_compute_what_the_plan_asks() -> None:
    latency = _queries_of("CreateTask latency")
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile}, sum by (le) (rate(")
            and "task_creation_duration_seconds_bucket" in e
            for e in latency
        ), quantile
    assert any("predict_linear(" in e for e in _queries_of("Database size projected 30 days ahead"))
    assert _queries_of("Active alerts") == ['ALERTS{alertstate="firing"}']
    pool = " ".join(_queries_of("Connection pool: in use and size"))
    assert "database_connections" in pool and "database_pool_size" in pool
    assert _queries_of("Burn rate (5m)") == ["slo_burn_rate"]


def test_every_panel_uses_the_datasource_variable() -> None:
    for name, board in load_dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus", name
        for panel in gen_dashboards._walk_panels(board["panels"]):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
            assert panel["targets"], f"{name}: {panel['title']} has no query"


def test_panel_ids_are_unique_per_dashboard() -> None:
    for name, board in load_dashboards().items():
        ids = [p["id"] for p in gen_dashboards._walk_panels(board["panels"])]
        assert len(ids) == len(set(ids)), name


def test_dashboards_and_rules_read_only_exported_or_recorded_metrics() -> None:
    known = series_names() | recorded_names() | BUILTIN
    exprs = rule_expressions() + [
        q.expr for board in load_dashboards().values() for q in panel_queries(board)
    ]
    unknown = {name: e for e in exprs for name in metric_names(e) if name not in known}
    assert not unknown, f"not in the metric contract nor recorded: {unknown}"


def test_every_contract_metric_is_on_a_dashboard() -> None:
    used = set()
    for board in load_dashboards().values():
        for query in panel_queries(board):
            used |= metric_names(query.expr)
    families = {m.name for m in CONTRACT if not (m.series_names() & used)}
    assert not families, f"exported but on no dashboard: {sorted(families)}"


def test_metric_names_sees_every_selector() -> None:
    expr = (
        'sum by (job) (rate(a_total{x="y"}[5m])) / on (job) group_left b:rec '
        "or vector(0) and histogram_quantile(0.9, c_bucket) > bool 1e3"
    )
    assert metric_names(expr) == {"a_total", "b:rec", "c_bucket"}


def test_docs_list_exactly_the_contract() -> None:
    text = (ROOT / "docs" / "sre" / "metrics.md").read_text()
    contract = text.split("\n## Contract\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_:]+)`", contract, flags=re.MULTILINE))
    assert documented == {m.name for m in CONTRACT}


def test_panel_queries_lists_every_target_and_expands_grafana_intervals() -> None:
    boards = load_dashboards()
    total = sum(
        len(p.get("targets", []))
        for b in boards.values()
        for p in gen_dashboards._walk_panels(b["panels"])
    )
    queries = [q for b in boards.values() for q in panel_queries(b)]
    assert len(queries) == total > 40
    for query in queries:
        assert "$" not in query.promql(), query
    assert (
        grafana_to_promql("rate(x[$__rate_interval]) + rate(y[${__interval}])", rate_interval="2m")
        == "rate(x[2m]) + rate(y[15s])"
    )
    with pytest.raises(ValueError, match=r"\$job"):
        grafana_to_promql('up{job="$job"}')
