"""The monitoring objects carry exactly what deploy/ holds: rules, dashboards, Alertmanager."""

from __future__ import annotations

from pathlib import Path

import yaml

from mhv_tools.gen_kubernetes import ALERTMANAGER_SECRETS, BACKUP_HOST_RULES
from tests.deploy.support import named, of_kind

ROOT = Path(__file__).resolve().parents[2]


def test_prometheus_rule_is_exactly_the_rule_files() -> None:
    (rule,) = of_kind("PrometheusRule")
    files = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    # But the backup host's: CloudNativePG backs the database up on Kubernetes.
    files = [path for path in files if path.name != BACKUP_HOST_RULES]
    assert files
    groups = [g for path in files for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == groups
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert {"Watchdog", "TaskCreationLatencyHigh"} <= alerts


def test_every_dashboard_is_a_config_map_the_grafana_sidecar_loads() -> None:
    files = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
    maps = [
        m for m in of_kind("ConfigMap") if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert len(maps) == len(files) == 3
    data = {name: text for m in maps for name, text in m["data"].items()}
    assert data == {p.name: p.read_text() for p in files}


def test_alertmanager_config_is_the_reviewed_file_reading_secrets_where_they_are_mounted() -> None:
    secret = named("Secret", "alertmanager-mahavishnu")
    rendered = secret["stringData"]["alertmanager.yaml"]
    original = (ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text()
    mounted = f"/etc/alertmanager/secrets/{ALERTMANAGER_SECRETS}/"
    assert rendered.replace(mounted, "/etc/alertmanager/secrets/") == original
    config = yaml.safe_load(rendered)
    files = [
        config["global"]["smtp_auth_password_file"],
        config["global"]["slack_api_url_file"],
        *(
            c["routing_key_file"]
            for r in config["receivers"]
            for c in r.get("pagerduty_configs", [])
        ),
    ]
    assert files and all(f.startswith(mounted) for f in files)
    # The configuration holds no secret itself: only paths to mounted files.
    assert "_file" in rendered and "password:" not in rendered
