"""Generate the Prometheus rules under deploy/prometheus/rules/ from the SLO spec.

Run as ``python -m mhv_tools.gen_rules`` (``make generate``); ``--check`` exits 1 when a rule
file is missing, stale, or left over. The spec is ``deploy/prometheus/slos.yaml``; everything
else an alert needs (its threshold, severity, runbook) is in this module, so that the rules are
written in one place and reviewed as code.

What comes out, following Sloth's naming and the SRE Workbook's alerting chapter:

- ``slo_<name>.yml``, one per SLO: the SLI error ratio over every window
  (``slo:sli_error:ratio_rate5m`` ... ``ratio_rate30d``), the objective and budget as series, the
  plan's gauges ``slo_burn_rate``, ``slo_error_budget_remaining_seconds`` and
  ``task_availability``, and the multiwindow multi-burn-rate alerts (page: 14.4x over 1h and 5m,
  or 6x over 6h and 30m; ticket: 1x over 3d and 6h). The gauges are recording rules over
  ``sum(rate(...))``, so any number of replicas gives one right answer, where a gauge set inside
  each process would not.
- ``slo_policy_alerts.yml``: the error budget policy's 2x / 5x / 10x steps, and the plan's
  TaskCreationLatencyHigh and TaskAvailabilityLow.
- ``platform_alerts.yml``: connection pool saturation, targets down or absent, audit chain
  breaks, outbox and inbox backlogs, and the always-firing Watchdog.
- ``backup_alerts.yml``: backups too old, backup verification failing, WAL not reaching the
  backup repository (limits in the spec's ``backups`` section).

Windows of a day and longer are computed from the recorded 5-minute rates
(``sum_over_time`` of errors over ``sum_over_time`` of events, weighted by traffic) rather than
from a ``rate()`` over days of raw samples on every evaluation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mhv_tools._generated import ROOT, sync

SPEC_FILE = ROOT / "deploy" / "prometheus" / "slos.yaml"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
HEADER = (
    "# Generated from deploy/prometheus/slos.yaml by `make generate`\n"
    "# (libs/tools/mhv_tools/gen_rules.py). Do not edit: change the spec or the generator.\n"
)
WINDOW_PLACEHOLDER = "{{.window}}"

# The Prometheus scrape jobs of the three services.
JOBS = {
    "task": "mahavishnu-task",
    "audit": "mahavishnu-audit",
    "webhook": "mahavishnu-webhook",
}
# The audit service verifies its whole chain hourly by default; three missed runs is stale.
AUDIT_VERIFICATION_MAX_AGE_SECONDS = 3 * 3600

# Refused calls per second, per service, sustained for ten minutes: far above a person mistyping
# or a token expiring now and then, well below what a credential-guessing run produces.
AUTHZ_REFUSALS_PER_SECOND = 1

# Severity is the one label Alertmanager routes on (deploy/alertmanager/alertmanager.yml).
Severity = Literal["page", "warning", "ticket", "none"]

# SLI windows computed from raw counters, and those computed from the recorded 5m rates.
RAW_WINDOWS = ("5m", "30m", "1h", "2h", "6h")
DERIVED_WINDOWS = ("1d", "3d")


@dataclass(frozen=True)
class BurnWindow:
    """One multiwindow condition: both windows burn faster than `factor` times sustainable."""

    factor: float
    long: str
    short: str


# SRE Workbook, "Alerting on SLOs", recommended parameters: spending 2 % of a 30-day budget
# in 1h or 5 % in 6h pages; 10 % in 3d opens a ticket. The short window (1/12 of the long one)
# lets the alert resolve soon after the burn stops.
PAGE_WINDOWS = (BurnWindow(14.4, "1h", "5m"), BurnWindow(6, "6h", "30m"))
TICKET_WINDOWS = (BurnWindow(1, "3d", "6h"),)


@dataclass(frozen=True)
class PolicyStep:
    """A step of docs/sre/ERROR_BUDGET_POLICY.md: burn rate above `factor` for `for_`."""

    alert: str
    factor: float
    for_: str
    severity: Severity
    action: str


POLICY_STEPS = (
    PolicyStep(
        "ErrorBudgetBurnRateWarning",
        2,
        "5m",
        "warning",
        "Warn the on-call engineer: the budget is being spent twice as fast as it accrues.",
    ),
    PolicyStep(
        "ErrorBudgetBurnRateCritical",
        5,
        "1m",
        "page",
        "Page the on-call engineer immediately.",
    ),
    PolicyStep(
        "ErrorBudgetBurnRateEmergency",
        10,
        "30s",
        "page",
        "Emergency: stop all deployments and page the on-call engineer.",
    ),
)


class Sli(BaseModel):
    """An SLI as a ratio of event rates; `{{.window}}` stands for the window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total: str
    errors: str | None = None
    good: str | None = None

    @model_validator(mode="after")
    def _one_of_errors_or_good(self) -> Sli:
        if (self.errors is None) == (self.good is None):
            raise ValueError("give exactly one of `errors` and `good`")
        for query in (self.total, self.errors, self.good):
            if query is not None and WINDOW_PLACEHOLDER not in query:
                raise ValueError(f"query lacks {WINDOW_PLACEHOLDER}: {query}")
        return self

    def error_rate(self, window: str) -> str:
        """Bad events per second over `window`; no series at all counts as no errors."""
        if self.errors is not None:
            bad = self.errors.replace(WINDOW_PLACEHOLDER, window)
        else:
            assert self.good is not None
            good = self.good.replace(WINDOW_PLACEHOLDER, window)
            bad = f"{self.total_rate(window)} - {good}"
        return f"({bad}) or vector(0)"

    def total_rate(self, window: str) -> str:
        """Eligible events per second over `window`."""
        return self.total.replace(WINDOW_PLACEHOLDER, window)


class Slo(BaseModel):
    """One service level objective of the spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    alert_stem: str = Field(pattern=r"^[A-Z][A-Za-z0-9]*$")
    title: str
    description: str
    objective: float = Field(gt=0, lt=100, description="percent of good events")
    window: str = Field(pattern=r"^[1-9][0-9]*d$")
    owner: str
    runbook: str = Field(pattern=r"^docs/runbooks/[a-z0-9-]+\.md$")
    sli: Sli

    @property
    def budget(self) -> float:
        """The error budget as a ratio of events (0.001 for 99.9 %)."""
        return round(1 - self.objective / 100, 12)

    @property
    def window_days(self) -> int:
        """Length of the SLO window in days."""
        return int(self.window[:-1])

    @property
    def window_seconds(self) -> int:
        """Length of the SLO window in seconds."""
        return self.window_days * 86400

    @property
    def windows(self) -> tuple[str, ...]:
        """Every window its error ratio is recorded over, shortest first."""
        derived = tuple(w for w in DERIVED_WINDOWS if w != self.window)
        return (*RAW_WINDOWS, *derived, self.window)


_DURATION = r"^[1-9][0-9]*[smhd]$"


def duration_seconds(text: str) -> int:
    """A duration of the spec (``26h``, ``8d``) in seconds."""
    return int(text[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]


class Backups(BaseModel):
    """The backup alerts' limits (docs/dr/backups.md); the exporter is scraped as `job`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    owner: str
    max_backup_age: str = Field(pattern=_DURATION)
    max_verification_age: str = Field(pattern=_DURATION)
    max_receiver_lag_bytes: int = Field(gt=0)
    max_unarchived_segments: int = Field(ge=0)


class Spec(BaseModel):
    """deploy/prometheus/slos.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1]
    # Empty: runbook links are repository paths (docs/runbooks/...), which open in a checkout
    # or on the repository's own web view; else the https:// base they are published under.
    runbook_base_url: str = Field(pattern=r"^(https://.+/)?$")
    slos: list[Slo]
    backups: Backups

    @field_validator("slos")
    @classmethod
    def _unique(cls, slos: list[Slo]) -> list[Slo]:
        for attribute in ("name", "alert_stem"):
            values = [getattr(s, attribute) for s in slos]
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(f"duplicate SLO {attribute}: {', '.join(duplicates)}")
        return slos

    def slo(self, name: str) -> Slo:
        """The SLO called `name`."""
        for slo in self.slos:
            if slo.name == name:
                return slo
        raise KeyError(name)

    def runbook_url(self, path: str) -> str:
        """The URL of the runbook at repository path `path`."""
        return self.runbook_base_url + path


def load_spec(path: Path = SPEC_FILE) -> Spec:
    """Read and validate the SLO spec."""
    return Spec.model_validate(yaml.safe_load(path.read_text()))


def number(value: float) -> str:
    """`value` as PromQL writes it: shortest exact form, no trailing ``.0``."""
    return f"{value:.12g}"


def ratio(slo: Slo, window: str) -> str:
    """The recorded error ratio of `slo` over `window`."""
    return f'slo:sli_error:ratio_rate{window}{{slo_name="{slo.name}"}}'


def record(name: str, expr: str, slo: Slo) -> dict[str, Any]:
    """A recording rule labelled with its SLO."""
    return {"record": name, "expr": expr, "labels": {"slo_name": slo.name}}


def alert(
    name: str,
    expr: str,
    *,
    severity: Severity,
    summary: str,
    description: str,
    runbook_url: str,
    for_: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An alerting rule with the labels and annotations every alert carries."""
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_ is not None:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": runbook_url,
    }
    return rule


def sli_rules(slo: Slo) -> list[dict[str, Any]]:
    """Recording rules of one SLO, in evaluation order (later rules read earlier ones)."""
    selector = f'{{slo_name="{slo.name}"}}'
    rules = [
        record("slo:sli_errors:rate5m", slo.sli.error_rate("5m"), slo),
        record("slo:sli_events:rate5m", slo.sli.total_rate("5m"), slo),
        record(
            "slo:sli_error:ratio_rate5m",
            f"slo:sli_errors:rate5m{selector} / slo:sli_events:rate5m{selector}",
            slo,
        ),
    ]
    for window in slo.windows[1:]:
        if window in RAW_WINDOWS:
            expr = f"({slo.sli.error_rate(window)})\n/\n{slo.sli.total_rate(window)}"
        else:
            expr = (
                f"sum_over_time(slo:sli_errors:rate5m{selector}[{window}])\n/\n"
                f"sum_over_time(slo:sli_events:rate5m{selector}[{window}])"
            )
        rules.append(record(f"slo:sli_error:ratio_rate{window}", expr, slo))
    budget = number(slo.budget)
    period = ratio(slo, slo.window)
    rules += [
        record("slo:objective:ratio", f"vector({number(slo.objective / 100)})", slo),
        record("slo:error_budget:ratio", f"vector({budget})", slo),
        record("slo:time_period:days", f"vector({slo.window_days})", slo),
        # The plan's gauges. The current burn rate is over 5m, as Sloth's
        # slo:current_burn_rate:ratio; the period figures are over the whole SLO window.
        record("slo_burn_rate", f"{ratio(slo, '5m')} / {budget}", slo),
        record("slo:period_burn_rate:ratio", f"{period} / {budget}", slo),
        record(
            "slo:period_error_budget_remaining:ratio",
            f"1 - slo:period_burn_rate:ratio{selector}",
            slo,
        ),
        record(
            "slo_error_budget_remaining_seconds",
            f"({budget} - {period}) * {slo.window_seconds}",
            slo,
        ),
    ]
    if slo.name == "task_availability":
        rules.append(record("task_availability", f"1 - {period}", slo))
    return rules


def burn_condition(slo: Slo, windows: tuple[BurnWindow, ...]) -> str:
    """Any of `windows` burning: the long window for significance, the short one for reset."""
    clauses = []
    for w in windows:
        threshold = f"({number(w.factor)} * {number(slo.budget)})"
        clauses.append(
            f"(\n  {ratio(slo, w.long)} > {threshold}\n"
            f"and\n  {ratio(slo, w.short)} > {threshold}\n)"
        )
    return "\nor\n".join(clauses)


def burn_rate_alerts(spec: Spec, slo: Slo) -> list[dict[str, Any]]:
    """The multiwindow multi-burn-rate page and ticket alerts of one SLO."""
    rules = []
    kinds: tuple[tuple[str, Severity, tuple[BurnWindow, ...]], ...] = (
        ("Fast", "page", PAGE_WINDOWS),
        ("Slow", "ticket", TICKET_WINDOWS),
    )
    for speed, severity, windows in kinds:
        steps = " or ".join(f"{number(w.factor)}x ({w.long} and {w.short})" for w in windows)
        rules.append(
            alert(
                f"{slo.alert_stem}ErrorBudgetBurn{speed}",
                burn_condition(slo, windows),
                severity=severity,
                summary=f"{slo.title} is burning its error budget ({speed.lower()} burn)",
                description=(
                    f"{slo.title} ({number(slo.objective)} % over {slo.window}) failed "
                    "{{ $value | humanizePercentage }} of events, spending the error "
                    f"budget at over {steps} the sustainable rate. Owner: {slo.owner}."
                ),
                runbook_url=spec.runbook_url(slo.runbook),
            )
        )
    return rules


def slo_group(spec: Spec, slo: Slo) -> dict[str, Any]:
    """One SLO's rules in one group: its alerts run right after the ratios they read."""
    return {"name": f"slo-{slo.name}", "rules": sli_rules(slo) + burn_rate_alerts(spec, slo)}


def policy_alerts(spec: Spec) -> dict[str, Any]:
    """The plan's SLO alerts and the error budget policy's burn rate steps."""
    latency = spec.slo("task_creation_latency")
    availability = spec.slo("task_availability")
    objective = number(availability.objective / 100)
    rules = [
        alert(
            "TaskCreationLatencyHigh",
            "histogram_quantile(0.95, sum by (le) (rate("
            f'task_creation_duration_seconds_bucket{{job="{JOBS["task"]}"}}[5m]))) > 0.1',
            for_="10m",
            severity="warning",
            # The SLO it watches, so that the SLO's page inhibits it and dashboards count it.
            labels={"slo_name": latency.name},
            summary="Task creation latency above SLO",
            description=(
                "p95 CreateTask latency is {{ $value | humanizeDuration }} over the last 5m "
                "(SLO: 95 % within 100ms)."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/task-creation-latency-high.md"),
        ),
        alert(
            "TaskAvailabilityLow",
            f'task_availability{{slo_name="{availability.name}"}} < {objective}',
            for_="5m",
            severity="page",
            summary="Task availability below SLO: the error budget is spent",
            description=(
                f"Task availability over {availability.window} is "
                "{{ $value | humanizePercentage }} "
                f"(SLO: {number(availability.objective)} %). The error budget policy applies: "
                "stop non-emergency deployments, postmortem before resuming."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/task-availability-low.md"),
        ),
    ]
    for step in POLICY_STEPS:
        rules.append(
            alert(
                step.alert,
                f"slo_burn_rate > {number(step.factor)}",
                for_=step.for_,
                severity=step.severity,
                summary=(
                    "Error budget of {{ $labels.slo_name }} burning over "
                    f"{number(step.factor)}x"
                ),
                description=(
                    "{{ $labels.slo_name }} is spending its error budget "
                    '{{ $value | printf "%.1f" }}x faster than it accrues (5m window, for '
                    f"{step.for_}). {step.action}"
                ),
                runbook_url=spec.runbook_url("docs/runbooks/error-budget-burn-rate.md"),
            )
        )
    return {"name": "slo-policy-alerts", "rules": rules}


def platform_alerts(spec: Spec) -> dict[str, Any]:
    """Alerts on the parts every SLO depends on."""
    jobs = "|".join(JOBS.values())
    rules = [
        alert(
            "DatabaseConnectionPoolExhausted",
            'database_connections{database="postgresql"}\n/\n'
            'database_pool_size{database="postgresql"}\n> 0.9',
            for_="5m",
            severity="page",
            summary="PostgreSQL connection pool nearly exhausted",
            description=(
                "{{ $labels.job }} on {{ $labels.instance }} has "
                "{{ $value | humanizePercentage }} of its {{ $labels.pool }} pool checked out; "
                "requests will soon wait for connections and fail with MHV-002."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/database-connection-pool-exhausted.md"),
        ),
        alert(
            "TargetDown",
            f'up{{job=~"{jobs}"}} == 0',
            for_="5m",
            severity="page",
            summary="{{ $labels.job }} target is down",
            description=(
                "Prometheus has failed to scrape {{ $labels.job }} on {{ $labels.instance }} "
                "for 5 minutes. Its SLIs cannot see requests it does not serve."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/target-down.md"),
        ),
    ]
    for service, job in JOBS.items():
        rules.append(
            alert(
                f"{service.capitalize()}TargetAbsent",
                f'absent(up{{job="{job}"}})',
                for_="5m",
                severity="page",
                summary=f"No {job} target in Prometheus",
                description=(
                    f"Prometheus has had no {job} target for 5 minutes: the service is not "
                    "deployed or service discovery lost it. Its SLOs are unmeasured."
                ),
                runbook_url=spec.runbook_url("docs/runbooks/target-absent.md"),
            )
        )
    rules += [
        alert(
            "AuditChainBroken",
            "sum(increase(audit_chain_verifications_total"
            f'{{job="{JOBS["audit"]}",result="broken"}}[1h])) > 0',
            severity="page",
            summary="Audit log hash chain verification failed",
            description=(
                '{{ $value | printf "%.0f" }} audit chain verifications in the last hour '
                "found a broken chain: audit records were altered or removed."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/audit-chain-broken.md"),
        ),
        alert(
            "AuditChainVerificationStale",
            # Per replica: its last intact verification, or, before its first one finished,
            # when it started; a fresh rollout is not stale, one that never verifies becomes so.
            "time() - max(\n  (audit_chain_last_verified_timestamp_seconds"
            f'{{job="{JOBS["audit"]}"}} > 0)\n  or on (instance)\n  process_start_time_seconds'
            f'{{job="{JOBS["audit"]}"}}\n) > {AUDIT_VERIFICATION_MAX_AGE_SECONDS}',
            for_="15m",
            severity="warning",
            summary="The audit chain has not been verified recently",
            description=(
                "No audit service has verified the whole hash chain intact for "
                "{{ $value | humanizeDuration }}: tampering would go unnoticed meanwhile."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/audit-verification-stale.md"),
        ),
        alert(
            "TaskOutboxBacklog",
            f'max by (job) (task_outbox_lag_seconds{{job="{JOBS["task"]}"}}) > 300',
            for_="10m",
            severity="warning",
            summary="Audit events are not leaving the task outbox",
            description=(
                "The oldest undelivered audit event is {{ $value | humanizeDuration }} old: "
                "the outbox relay cannot deliver to the audit service."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/task-outbox-backlog.md"),
        ),
        alert(
            "WebhookOutboxBacklog",
            f'max by (job) (webhook_outbox_lag_seconds{{job="{JOBS["webhook"]}"}}) > 300',
            for_="10m",
            severity="warning",
            summary="Audit events of operators' actions are not leaving the gateway's outbox",
            description=(
                "The oldest undelivered audit event of the webhook gateway is "
                "{{ $value | humanizeDuration }} old: its outbox relay cannot deliver to the "
                "audit service."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/task-outbox-backlog.md"),
        ),
        alert(
            "AuthorizationRefusalsHigh",
            f'sum by (job) (rate(mhv_authz_denied_total{{job=~"{jobs}"}}[5m])) > '
            f"{AUTHZ_REFUSALS_PER_SECOND}",
            for_="10m",
            severity="warning",
            summary="Many calls to {{ $labels.job }} are refused for who the caller is",
            description=(
                '{{ $value | printf "%.2f" }} calls per second to {{ $labels.job }} end '
                "UNAUTHENTICATED or PERMISSION_DENIED: a client with a revoked or expired "
                "credential, a misconfigured service, or someone probing. The security log "
                "(logger mhv.security) says who and what."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/authorization-refusals.md"),
        ),
        alert(
            "TaskEmbeddingBacklog",
            f'max by (job) (task_embedding_backlog_age_seconds{{job="{JOBS["task"]}"}}) > 600',
            for_="15m",
            severity="warning",
            summary="Tasks are not being embedded for semantic search",
            description=(
                "The oldest task waiting to be embedded has waited "
                "{{ $value | humanizeDuration }}: new and edited tasks are found by keyword "
                "only until the embedding worker catches up."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/embedding-backlog.md"),
        ),
        alert(
            "EmbeddingRemoteProviderFailing",
            "(\n"
            "  sum by (job) (rate(task_embedding_requests_total"
            f'{{job="{JOBS["task"]}",outcome=~"local_fallback|error"}}[10m]))\n'
            "  /\n"
            f'  sum by (job) (rate(task_embedding_requests_total{{job="{JOBS["task"]}"}}[10m]))\n'
            ") > 0.5\n"
            "and on (job)\n"
            f'max by (job) (task_embedding_remote_configured{{job="{JOBS["task"]}"}}) == 1',
            for_="10m",
            severity="warning",
            summary="The remote embeddings provider keeps failing",
            description=(
                "{{ $value | humanizePercentage }} of embedding calls were answered by the "
                "local fallback model or not at all: the remote provider is failing, and "
                "queries wait for its timeout before falling back."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/embedding-provider-failing.md"),
        ),
        alert(
            "WebhookInboxBacklog",
            f'max by (job) (webhook_inbox_lag_seconds{{job="{JOBS["webhook"]}"}}) > 300',
            for_="10m",
            severity="warning",
            summary="Accepted webhooks are not being processed",
            description=(
                "The oldest unprocessed webhook delivery is {{ $value | humanizeDuration }} "
                "old: saga workers are stuck or the task service is unreachable."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/webhook-inbox-backlog.md"),
        ),
        alert(
            "RateLimitStorageDown",
            "min by (job) (rate_limit_storage_up"
            f'{{job=~"{JOBS["task"]}|{JOBS["audit"]}|{JOBS["webhook"]}"}}) == 0',
            for_="2m",
            severity="warning",
            summary="A service cannot reach the shared rate-limit storage (Redis)",
            description=(
                "{{ $labels.job }} has had no answer from Redis for 2 minutes: its rate limits "
                "are counted per process (each replica allows the full budget) and classes in "
                "MHV_RATE_LIMIT_FAIL_CLOSED are refused with MHV-018."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/rate-limit-storage-down.md"),
        ),
        alert(
            "Watchdog",
            "vector(1)",
            severity="none",
            summary="Alerting pipeline heartbeat",
            description=(
                "Always firing. If the heartbeat receiver stops getting it, Prometheus, "
                "Alertmanager or the path between them is broken."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/watchdog.md"),
        ),
    ]
    return {"name": "mahavishnu-platform-alerts", "rules": rules}


def backup_alerts(spec: Spec) -> dict[str, Any]:
    """Alerts on the backups: too old, failing verification, WAL not reaching the repository.

    The metrics come from the backup exporter (``mhv backup exporter``) on the backup host. A
    metric that is absent (no backup ever, exporter gone) counts as the worst value: never
    backed up, never verified (age: since the epoch), not streaming. Every alert carries the
    exporter's job label.
    """
    b = spec.backups
    job = f'job="{b.job}"'
    backup_age = duration_seconds(b.max_backup_age)
    verification_age = duration_seconds(b.max_verification_age)
    rules = [
        alert(
            "BackupTooOld",
            f"time() - max by (job) (mhv_backup_last_success_timestamp_seconds{{{job}}})"
            f" > {backup_age}\nor\n"
            f"absent(mhv_backup_last_success_timestamp_seconds{{{job}}}) * time()",
            for_="15m",
            severity="warning",
            summary="No recent backup",
            description=(
                "The newest completed backup ended {{ $value | humanizeDuration }} ago (limit "
                f"{b.max_backup_age}; decades: none was ever reported). Point-in-time recovery "
                "and restores take longer the older it is, and full backups stop accruing. "
                f"Owner: {b.owner}."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/backup-too-old.md"),
        ),
        alert(
            "BackupVerificationFailed",
            f"max by (job) (mhv_backup_verification_last_ok{{{job}}}) == 0\nor\n"
            "time() - max by (job) (mhv_backup_verification_last_success_timestamp_seconds"
            f"{{{job}}}) > {verification_age}\nor\n"
            "absent(mhv_backup_verification_last_success_timestamp_seconds"
            f"{{{job}}}) * time()",
            for_="5m",
            severity="warning",
            summary="Backups are not proven restorable",
            description=(
                "The last backup verification failed, or none passed in the last "
                f"{b.max_verification_age}: a restore might not work when it is needed. The "
                "report is verification/last.json in the backup repository. "
                f"Owner: {b.owner}."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/backup-verification-failed.md"),
        ),
        alert(
            "WalArchivingFailing",
            "\nor\n".join(
                [
                    f"max by (job) (mhv_wal_receiver_streaming{{{job}}}) == 0",
                    f"max by (job) (mhv_wal_receiver_lag_bytes{{{job}}})"
                    f" > {b.max_receiver_lag_bytes}",
                    f"max by (job) (mhv_wal_unarchived_segments{{{job}}})"
                    f" > {b.max_unarchived_segments}",
                    f"max by (job) (mhv_wal_archive_errors{{{job}}}) > 0",
                    f"absent(mhv_wal_receiver_streaming{{{job}}})",
                ]
            ),
            for_="5m",
            severity="page",
            summary="WAL is not reaching the backup repository",
            description=(
                "The WAL receiver is not streaming synchronously, is behind, or the repository "
                "is not archiving what it received (value {{ $value }}). Commits wait for the "
                "receiver: writes stall while it is down; and every point-in-time restore "
                f"after this moment is at risk. Owner: {b.owner}."
            ),
            runbook_url=spec.runbook_url("docs/runbooks/wal-archiving-failing.md"),
        ),
    ]
    return {"name": "mahavishnu-backup-alerts", "rules": rules}


def rule_files(spec: Spec) -> dict[str, dict[str, Any]]:
    """File name -> content of every rule file."""
    files = {f"slo_{slo.name}.yml": {"groups": [slo_group(spec, slo)]} for slo in spec.slos}
    files["slo_policy_alerts.yml"] = {"groups": [policy_alerts(spec)]}
    files["platform_alerts.yml"] = {"groups": [platform_alerts(spec)]}
    files["backup_alerts.yml"] = {"groups": [backup_alerts(spec)]}
    return files


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so expressions read as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(content: dict[str, Any]) -> str:
    """One rule file as YAML text."""
    body = yaml.dump(content, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True)
    return HEADER + body


def expected(spec: Spec | None = None) -> dict[Path, str]:
    """Every file deploy/prometheus/rules/ should hold, with its content."""
    spec = spec or load_spec()
    return {RULES_DIR / name: render(content) for name, content in rule_files(spec).items()}


def main(argv: list[str] | None = None) -> int:
    """Write the rules, or with --check report drift."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the rules are stale")
    args = parser.parse_args(argv)
    spec = load_spec()
    missing = [s.runbook for s in spec.slos if not (ROOT / s.runbook).is_file()]
    if missing:
        print(f"runbook pages missing: {', '.join(missing)}", file=sys.stderr)
        return 1
    return sync(expected(spec), RULES_DIR, "*.yml", check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
