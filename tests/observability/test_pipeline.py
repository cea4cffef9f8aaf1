"""The whole path on real processes: exporters -> Prometheus (rules) -> Alertmanager -> receiver.

Three exporters serve the metric contract (tests/observability/contract.py) under the scrape
job names of the services, a fourth the backup exporter's metrics. A real Prometheus scrapes
them every second and evaluates the generated rules; every rule must evaluate without error,
every recorded series and every dashboard panel query must return data, and the always-firing
Watchdog must travel from Prometheus through a real Alertmanager to the heartbeat receiver.

The same `Prometheus` fixture and `panel_queries` serve the test against the running services,
which drives real traffic instead of the exporters.
"""

from __future__ import annotations

import secrets
from contextlib import ExitStack
from pathlib import Path

from mhv_tools import gen_rules
from mhv_tools.gen_dashboards import load_dashboards, panel_queries
from mhv_tools.gen_rules import JOBS
from tests.observability.alertmanager import (
    Alertmanager,
    LocalEndpoints,
    load_config,
    render_local_config,
)
from tests.observability.contract import BACKUP, ContractExporter
from tests.observability.prometheus import RULE_FILES, Prometheus, scrape_config
from tests.observability.receivers import HttpSink, SmtpSink, TlsFiles
from tests.observability.test_dashboards import recorded_names


def test_rules_and_panels_on_a_real_prometheus_and_the_watchdog_reaches_alertmanager(
    tmp_path: Path,
) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    tls = TlsFiles.create(tmp_path)
    with ExitStack() as stack:
        jobs = {**JOBS, BACKUP: gen_rules.load_spec().backups.job}
        exporters = {
            job: stack.enter_context(ContractExporter(service).server())
            for service, job in jobs.items()
        }
        heartbeat = stack.enter_context(HttpSink())
        other = stack.enter_context(HttpSink())
        password = secrets.token_urlsafe(8)
        smtp = stack.enter_context(SmtpSink(tls, username="alertmanager", password=password))
        for name, content in {
            "pagerduty-routing-key": "key",
            "smtp-password": password,
            "heartbeat-token": "token",
            "slack-webhook-url": other.url("/slack"),
        }.items():
            (secrets_dir / name).write_text(content)
        alertmanager = stack.enter_context(
            Alertmanager(
                render_local_config(
                    load_config(),
                    LocalEndpoints(
                        secrets_dir,
                        smtp.port,
                        tls.cert,
                        other.url("/pagerduty"),
                        heartbeat.url("/ping"),
                    ),
                ),
                tmp_path / "alertmanager",
            )
        )
        config = scrape_config(
            {job: [e.address] for job, e in exporters.items()},
            alertmanagers=[f"127.0.0.1:{alertmanager.port}"],
        )
        prometheus = stack.enter_context(Prometheus(config, RULE_FILES, tmp_path / "prometheus"))
        prometheus.wait_for_targets(set(jobs.values()))

        # Rates need two scrapes, and the SLO rules read their own 5m rates.
        recorded = recorded_names()
        prometheus.wait_until(
            'count by (__name__) ({__name__=~"slo:.+|slo_.+|task_availability"})',
            lambda result: {r["metric"]["__name__"] for r in result} >= recorded,
        )
        groups = prometheus.rule_groups()
        assert {g["file"] for g in groups} == {str(p) for p in RULE_FILES}
        broken = [
            f"{rule['name']}: {rule.get('lastError')}"
            for group in groups
            for rule in group["rules"]
            if rule["health"] != "ok"
        ]
        assert not broken, broken

        queries = [q for board in load_dashboards().values() for q in panel_queries(board)]
        # Raises PromQLError if Prometheus cannot parse or run a query.
        empty = prometheus.panels_without_data(queries)
        assert not empty, f"panels without data: {empty}"

        firing = prometheus.wait_until('ALERTS{alertname="Watchdog",alertstate="firing"}')
        assert firing[0]["metric"]["severity"] == "none"
        ping = heartbeat.wait_for(lambda r: True)
        assert {a["labels"]["alertname"] for a in ping.json()["alerts"]} == {"Watchdog"}
        # Healthy targets raise neither TargetDown nor a TargetAbsent.
        assert not prometheus.query('ALERTS{alertname=~"Target.*"}')
