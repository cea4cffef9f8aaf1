"""Alertmanager: a valid config, routing by severity, secrets only in files, and real delivery.

The end-to-end test runs the real Alertmanager with the deployed config pointed at listeners on
127.0.0.1 (a PagerDuty Events v2 stub, a Slack webhook stub, a heartbeat stub and an SMTP server
demanding STARTTLS and a login), fires alerts at its API, and reads what each receiver got.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.observability.alertmanager import (
    SECRETS_DIR,
    Alertmanager,
    LocalEndpoints,
    load_config,
    render_local_config,
    secret_files,
    walk,
)
from tests.observability.receivers import HttpSink, SmtpSink, TlsFiles
from tests.observability.test_rules import alert_rules
from tests.observability.tools import ALERTMANAGER_CONFIG, run

RECEIVER_BY_SEVERITY = {
    "page": "pagerduty",
    "warning": "slack-warnings",
    "ticket": "email-tickets",
}
# Settings that would hold a secret inline; each has a `_file` twin that must be used instead.
INLINE_SECRETS = {
    "smtp_auth_password",
    "smtp_auth_secret",
    "auth_password",
    "auth_secret",
    "slack_api_url",
    "api_url",
    "routing_key",
    "service_key",
    "credentials",
    "password",
    "bearer_token",
    "api_key",
    "opsgenie_api_key",
    "victorops_api_key",
    "wechat_api_secret",
    "bot_token",
    "token",
}


def test_config_passes_amtool_check_config() -> None:
    result = run("amtool", "check-config", ALERTMANAGER_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _route(labels: dict[str, str], receiver: str) -> tuple[int, str]:
    result = run(
        "amtool",
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--verify.receivers={receiver}",
        *(f"{k}={v}" for k, v in labels.items()),
    )
    return result.returncode, result.stdout + result.stderr


ROUTING_CASES = [
    ({"alertname": "TaskAvailabilityErrorBudgetBurnFast", "severity": "page"}, "pagerduty"),
    ({"alertname": "TargetDown", "severity": "page", "job": "mahavishnu-task"}, "pagerduty"),
    ({"alertname": "ErrorBudgetBurnRateWarning", "severity": "warning"}, "slack-warnings"),
    ({"alertname": "TaskOutboxBacklog", "severity": "warning"}, "slack-warnings"),
    ({"alertname": "SearchSuccessErrorBudgetBurnSlow", "severity": "ticket"}, "email-tickets"),
    ({"alertname": "Watchdog", "severity": "none"}, "heartbeat"),
    # The Watchdog route comes first: it never pages, whatever its severity says.
    ({"alertname": "Watchdog", "severity": "page"}, "heartbeat"),
    # Nothing is dropped: unknown, missing or misspelt severities land in Slack.
    ({"alertname": "SomethingNew", "severity": "info"}, "slack-warnings"),
    ({"alertname": "SomethingNew"}, "slack-warnings"),
    ({"alertname": "SomethingNew", "severity": "Page"}, "slack-warnings"),
]


@pytest.mark.parametrize(("labels", "receiver"), ROUTING_CASES)
def test_routes(labels: dict[str, str], receiver: str) -> None:
    code, output = _route(labels, receiver)
    assert code == 0, output


def test_verify_receivers_fails_on_a_wrong_receiver() -> None:
    code, output = _route({"alertname": "X", "severity": "page"}, "slack-warnings")
    assert code != 0, output


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_generated_alert_reaches_the_receiver_of_its_severity(rule: dict[str, Any]) -> None:
    labels = {"alertname": rule["alert"], **rule["labels"]}
    severity = labels["severity"]
    expected = "heartbeat" if rule["alert"] == "Watchdog" else RECEIVER_BY_SEVERITY[severity]
    code, output = _route(labels, expected)
    assert code == 0, output


def test_secrets_only_come_from_files() -> None:
    config = load_config()
    inline = [".".join(keys) for keys, _ in walk(config) if keys[-1] in INLINE_SECRETS]
    assert not inline, f"secrets inline: {inline}"
    files = [(keys, v) for keys, v in walk(config) if keys[-1].endswith("_file")]
    assert files
    outside = [".".join(k) for k, v in files if not str(v).startswith(SECRETS_DIR)]
    assert not outside, f"secret files outside {SECRETS_DIR}: {outside}"
    assert secret_files(config) == {
        "smtp-password",
        "slack-webhook-url",
        "pagerduty-routing-key",
        "heartbeat-token",
    }


def _alert(name: str, severity: str, summary: str, **labels: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": name, "severity": severity, **labels},
        "annotations": {
            "summary": summary,
            "description": f"{summary} (end-to-end delivery test)",
            "runbook_url": f"docs/runbooks/{name.lower()}.md",
        },
    }


PAGE = _alert(
    "TaskAvailabilityErrorBudgetBurnFast",
    "page",
    "Task availability is burning its error budget",
    slo_name="task_availability",
)
# Inhibited by PAGE: same SLO, lower severity.
PAGE_SHADOW = _alert(
    "ErrorBudgetBurnRateWarning",
    "warning",
    "Error budget of task_availability burning over 2x",
    slo_name="task_availability",
)
WARNING = _alert(
    "TaskOutboxBacklog",
    "warning",
    "Audit events are not leaving the task outbox",
    job="mahavishnu-task",
)
TICKET = _alert(
    "WorkflowSuccessErrorBudgetBurnSlow",
    "ticket",
    "Workflow success is burning its error budget",
    slo_name="workflow_success",
)
WATCHDOG = _alert("Watchdog", "none", "Alerting pipeline heartbeat")


def _names(payload: dict[str, Any]) -> set[str]:
    return {a["labels"]["alertname"] for a in payload.get("alerts", [])}


def test_alerts_reach_every_receiver(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    routing_key = secrets.token_hex(16)
    smtp_password = secrets.token_urlsafe(12)
    heartbeat_token = secrets.token_urlsafe(12)
    slack_path = f"/services/T0000/B0000/{secrets.token_hex(8)}"
    tls = TlsFiles.create(tmp_path)
    with (
        HttpSink(status=202, reply=b'{"status":"success"}') as pagerduty,
        HttpSink() as slack,
        HttpSink() as heartbeat,
        SmtpSink(tls, username="alertmanager", password=smtp_password) as smtp,
    ):
        (secrets_dir / "pagerduty-routing-key").write_text(routing_key)
        (secrets_dir / "smtp-password").write_text(smtp_password)
        (secrets_dir / "heartbeat-token").write_text(heartbeat_token)
        (secrets_dir / "slack-webhook-url").write_text(slack.url(slack_path))
        config = render_local_config(
            load_config(),
            LocalEndpoints(
                secrets_dir=secrets_dir,
                smtp_port=smtp.port,
                smtp_ca_file=tls.cert,
                pagerduty_url=pagerduty.url("/v2/enqueue"),
                heartbeat_url=heartbeat.url("/ping/alertmanager"),
            ),
        )
        with Alertmanager(config, tmp_path / "alertmanager") as alertmanager:
            alertmanager.post_alerts([PAGE, PAGE_SHADOW, WARNING, TICKET, WATCHDOG])

            page = pagerduty.wait_for(lambda r: True).json()
            assert page["routing_key"] == routing_key
            assert page["event_action"] == "trigger"
            assert page["payload"]["summary"] == PAGE["annotations"]["summary"]
            assert page["payload"]["severity"] == "critical"
            assert page["payload"]["class"] == "TaskAvailabilityErrorBudgetBurnFast"
            assert page["links"][0]["href"] == PAGE["annotations"]["runbook_url"]

            message = slack.wait_for(lambda r: True)
            assert message.path == slack_path
            warning = message.json()
            assert warning["channel"] == "#mahavishnu-alerts"
            assert WARNING["annotations"]["summary"] in warning["attachments"][0]["title"]
            assert WARNING["annotations"]["description"] in warning["attachments"][0]["text"]

            mail = smtp.wait_for(lambda m: True)
            assert mail.over_tls
            assert mail.login == "alertmanager"
            assert mail.recipients == ["sre-tickets@mahavishnu.example"]
            assert "WorkflowSuccessErrorBudgetBurnSlow" in mail.message["Subject"]

            ping = heartbeat.wait_for(lambda r: True)
            assert ping.headers["authorization"] == f"Bearer {heartbeat_token}"
            assert _names(ping.json()) == {"Watchdog"}

            # The warning about the paged SLO is held back, not delivered.
            states = {a["labels"]["alertname"]: a["status"] for a in alertmanager.alerts()}
            assert states["ErrorBudgetBurnRateWarning"]["state"] == "suppressed"
            assert states["ErrorBudgetBurnRateWarning"]["inhibitedBy"]
            assert states["TaskOutboxBacklog"]["state"] == "active"

        # Stopped: nothing more can arrive. Each receiver got only its own alerts.
        paged = {r.json()["payload"]["class"] for r in pagerduty.requests}
        assert paged == {"TaskAvailabilityErrorBudgetBurnFast"}
        slack_titles = " ".join(r.json()["attachments"][0]["title"] for r in slack.requests)
        assert "task_availability burning over 2x" not in slack_titles
        assert PAGE["annotations"]["summary"] not in slack_titles
        assert {m.recipients[0] for m in smtp.mails} == {"sre-tickets@mahavishnu.example"}
        assert all("WorkflowSuccess" in m.message["Subject"] for m in smtp.mails)
        assert all(_names(r.json()) == {"Watchdog"} for r in heartbeat.requests)
