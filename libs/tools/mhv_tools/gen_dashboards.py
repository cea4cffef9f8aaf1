"""Generate the Grafana dashboards under deploy/grafana/dashboards/ as code.

Run as ``python -m mhv_tools.gen_dashboards`` (``make generate``); ``--check`` exits 1 when a
dashboard is missing, stale, or left over. Built with grafana-foundation-sdk, pinned in
pyproject.toml to its Grafana 11.3 build, so the JSON matches the schema of that Grafana.

The plan's three dashboards:

- ``slo.json`` (executive view): status of every SLO over its window, error budget remaining,
  burn rate trend, SLO alerts firing.
- ``operational-health.json`` (on-call view): CreateTask latency p50/p95/p99, errors by
  operation and by MHV code, database pool in use against its size, outbox and inbox, active
  alerts.
- ``capacity-planning.json``: task volume, database size per schema and its 30-day projection
  (``predict_linear``), query latency trend, pool headroom.

Queries use only the metric contract (docs/sre/metrics.md) and the series recorded by the SLO
rules (deploy/prometheus/rules/). ``panel_queries`` lists every panel's PromQL so that a test can
run each one against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from mhv_tools._generated import ROOT, sync
from mhv_tools.gen_rules import JOBS, Slo, load_spec

DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
TAG = "mahavishnu"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
OUR_JOBS = f'job=~"{"|".join(JOBS.values())}"'
TASK = f'job="{JOBS["task"]}"'
WEBHOOK = f'job="{JOBS["webhook"]}"'
AUDIT = f'job="{JOBS["audit"]}"'
SERVER_FAILURES = 'grpc_code=~"INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|UNKNOWN|DATA_LOSS"'
RATE = "$__rate_interval"
# A zero line for every scraped service, so that "no errors" reads 0 rather than "no data"
# (and a service Prometheus cannot see still reads "no data").
ZERO_PER_JOB = f"0 * max by (job) (up{{{OUR_JOBS}}})"


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False


def _target(query: Query, ref_id: str) -> prometheus.Dataquery:
    target = (
        prometheus.Dataquery()
        .expr(query.expr)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .legend_format(query.legend or "__auto")
    )
    return target.instant() if query.instant else target.range()


PanelBuilder = TypeVar("PanelBuilder", timeseries.Panel, stat.Panel, bargauge.Panel, table.Panel)


def _targets(panel: PanelBuilder, queries: Sequence[Query]) -> PanelBuilder:
    for index, query in enumerate(queries):
        panel = panel.with_target(_target(query, chr(ord("A") + index)))
    return panel


def _framed(
    panel: PanelBuilder, title: str, description: str, width: int, height: int
) -> PanelBuilder:
    """`panel` with its title, description, place in the grid and the data source variable."""
    return (
        panel.title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(width)
        .height(height)
    )


def _thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value, color) for value, color in steps])
    )


def series_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    thresholds: Sequence[tuple[float | None, str]] = (),
    soft_min: float | None = 0,
) -> timeseries.Panel:
    """A time series panel; thresholds, if any, are drawn as dashed lines."""
    panel = (
        _framed(timeseries.Panel(), title, description, width, height)
        .unit(unit)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if soft_min is not None:
        panel = panel.axis_soft_min(soft_min)
    if thresholds:
        panel = panel.thresholds(_thresholds(*thresholds)).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
    return _targets(panel, queries)


def stat_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    thresholds: Sequence[tuple[float | None, str]],
    width: int = 6,
    height: int = 5,
    decimals: float | None = None,
) -> stat.Panel:
    """A single-value panel coloured by its thresholds, with a sparkline."""
    panel = (
        _framed(stat.Panel(), title, description, width, height)
        .unit(unit)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .thresholds(_thresholds(*thresholds))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if decimals is not None:
        panel = panel.decimals(decimals)
    return _targets(panel, queries)


def bar_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    thresholds: Sequence[tuple[float | None, str]],
    minimum: float | None = None,
    maximum: float | None = None,
    width: int = 12,
    height: int = 8,
) -> bargauge.Panel:
    """A horizontal bar gauge, one bar per series."""
    panel = (
        _framed(bargauge.Panel(), title, description, width, height)
        .unit(unit)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .thresholds(_thresholds(*thresholds))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    return _targets(panel, queries)


def table_panel(
    title: str, description: str, queries: Sequence[Query], *, width: int = 24, height: int = 8
) -> table.Panel:
    """A table of the instant values of `queries`, one row per series."""
    panel = _framed(table.Panel(), title, description, width, height)
    for index, query in enumerate(queries):
        target = _target(Query(query.expr, query.legend, instant=True), chr(ord("A") + index))
        panel = panel.with_target(target.format(PromQueryFormat.TABLE))
    return panel


def _base(uid: str, title: str, description: str, time_from: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .timezone("utc")
        .time(time_from, "now")
        .refresh("1m")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .link(
            dashboard.DashboardLink("Mahavishnu")
            .type(DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .keep_time(True)
        )
    )


def _percent(value: float) -> str:
    return f"{value:.12g}"


def _slo_status(slo: Slo, width: int) -> stat.Panel:
    objective = slo.objective / 100
    return stat_panel(
        slo.title,
        f"{slo.description} Objective: {_percent(slo.objective)} % of events over "
        f"{slo.window}. Red when below it. Owner: {slo.owner}.",
        [Query(f'1 - slo:sli_error:ratio_rate{slo.window}{{slo_name="{slo.name}"}}', slo.title)],
        unit="percentunit",
        decimals=3 if objective >= 0.99 else 2,
        thresholds=[(None, "red"), (objective, "green")],
        width=width,
    )


def slo_dashboard() -> dashboard.Dashboard:
    """The executive view: are we meeting our objectives, and how fast is budget going."""
    spec = load_spec()
    widths = [24 // len(spec.slos)] * len(spec.slos)
    widths[-1] += 24 - sum(widths)
    board = _base(
        "mhv-slo",
        "Mahavishnu / SLOs",
        "Service level objectives (deploy/prometheus/slos.yaml): status over the SLO window, "
        "error budget remaining, burn rate and SLO alerts. "
        "See docs/sre/TASK_ORCHESTRATION_SLOS.md.",
        "now-7d",
    ).with_row(dashboard.Row("Status over the SLO window"))
    for slo, width in zip(spec.slos, widths, strict=True):
        board = board.with_panel(_slo_status(slo, width))
    board = (
        board.with_row(dashboard.Row("Error budget"))
        .with_panel(
            bar_panel(
                "Error budget remaining",
                "Share of each SLO's 30-day error budget not yet spent, if the error ratio "
                "seen so far held for the whole window. Below 0: the SLO is breached and the "
                "error budget policy's exhaustion rules apply.",
                [Query("slo:period_error_budget_remaining:ratio", "{{slo_name}}", instant=True)],
                unit="percentunit",
                thresholds=[(None, "red"), (0, "orange"), (0.25, "yellow"), (0.5, "green")],
                minimum=-0.5,
                maximum=1,
            )
        )
        .with_panel(
            bar_panel(
                "Error budget remaining (time)",
                "slo_error_budget_remaining_seconds: the budget as time at full outage "
                "(43.2 minutes for 99.9 % over 30 days) minus what failures have spent.",
                [Query("slo_error_budget_remaining_seconds", "{{slo_name}}", instant=True)],
                unit="s",
                thresholds=[(None, "red"), (0, "green")],
                minimum=0,
            )
        )
        .with_panel(
            series_panel(
                "Error budget remaining over time",
                "How the remaining budget moved; a steady fall is a slow burn, a cliff a fast one.",
                [Query("slo:period_error_budget_remaining:ratio", "{{slo_name}}")],
                unit="percentunit",
                width=24,
                thresholds=[(None, "red"), (0, "green")],
                soft_min=None,
            )
        )
        .with_row(dashboard.Row("Burn rate"))
        .with_panel(
            series_panel(
                "Burn rate (5m)",
                "slo_burn_rate: how many times faster than sustainable each SLO spends its "
                "budget. Policy steps: 2x warns, 5x pages, 10x stops deployments.",
                [Query("slo_burn_rate", "{{slo_name}}")],
                thresholds=[(None, "green"), (2, "yellow"), (5, "orange"), (10, "red")],
            )
        )
        .with_panel(
            series_panel(
                "Burn rate over the alerting windows",
                "Burn rate over 1h and 6h (pages at 14.4x and 6x with their short windows) "
                "and 3d (a ticket at 1x).",
                [
                    Query(
                        "slo:sli_error:ratio_rate1h / on (slo_name) slo:error_budget:ratio",
                        "{{slo_name}} 1h",
                    ),
                    Query(
                        "slo:sli_error:ratio_rate6h / on (slo_name) slo:error_budget:ratio",
                        "{{slo_name}} 6h",
                    ),
                    Query(
                        "slo:sli_error:ratio_rate3d / on (slo_name) slo:error_budget:ratio",
                        "{{slo_name}} 3d",
                    ),
                ],
                thresholds=[(None, "green"), (1, "yellow"), (6, "orange"), (14.4, "red")],
            )
        )
        .with_row(dashboard.Row("Breaches"))
        .with_panel(
            series_panel(
                "SLO alerts firing",
                "Alerts about an SLO (burn rate pages and tickets, policy steps, "
                "TaskAvailabilityLow, TaskCreationLatencyHigh) firing per SLO; 0 when none.",
                [
                    Query(
                        'sum by (slo_name) (ALERTS{alertstate="firing",slo_name!=""})\n'
                        "or on (slo_name)\n0 * slo:objective:ratio",
                        "{{slo_name}}",
                    )
                ],
                width=12,
            )
        )
        .with_panel(
            series_panel(
                "SLI over one day against the objective",
                "Good events over the last day per SLO; the objective is the dashed line of each.",
                [
                    Query("1 - slo:sli_error:ratio_rate1d", "{{slo_name}}"),
                    Query("slo:objective:ratio", "{{slo_name}} objective"),
                ],
                unit="percentunit",
                soft_min=None,
            )
        )
    )
    return board


def operational_health_dashboard() -> dashboard.Dashboard:
    """The on-call view: what is slow, what fails, is the database keeping up."""
    create = f"task_creation_duration_seconds_bucket{{{TASK}}}"
    return (
        _base(
            "mhv-operational-health",
            "Mahavishnu / Operational health",
            "On-call view of the task, audit and webhook services: latency, errors, database "
            "pools, the audit outbox and the webhook inbox, and active alerts.",
            "now-6h",
        )
        .with_row(dashboard.Row("Task creation"))
        .with_panel(
            series_panel(
                "CreateTask latency",
                "p50, p95 and p99 from task_creation_duration_seconds, all replicas and "
                "repositories together. The SLO wants 95 % under 100ms (dashed line).",
                [
                    Query(
                        f"histogram_quantile({q}, sum by (le) (rate({create}[{RATE}])))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
                unit="s",
                thresholds=[(None, "green"), (0.1, "red")],
            )
        )
        .with_panel(
            series_panel(
                "Task creations by status",
                "CreateTask outcomes per second: success, rejected (the caller's mistake) "
                "and error.",
                [
                    Query(
                        f"sum by (status) (rate(task_creation_total{{{TASK}}}[{RATE}]))",
                        "{{status}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "Searches by status",
                "Semantic and hybrid SearchTasks outcomes per second: success, rejected (the "
                "caller's query, or no pgvector) and error (counted against the search SLO).",
                [
                    Query(
                        f"sum by (status) (rate(semantic_search_total{{{TASK}}}[{RATE}]))",
                        "{{status}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_row(dashboard.Row("Semantic search"))
        .with_panel(
            series_panel(
                "Embeddings by provider",
                "Embedding calls per second by purpose (query, index: the worker) and by which "
                "provider answered: remote, local_fallback, error. EmbeddingRemoteProviderFailing "
                "fires when a configured remote provider loses more than half of them.",
                [
                    Query(
                        "sum by (purpose, outcome) (rate(task_embedding_requests_total"
                        f"{{{TASK}}}[{RATE}]))",
                        "{{purpose}} {{outcome}}",
                    ),
                    Query(f"max(task_embedding_remote_configured{{{TASK}}})", "remote configured"),
                ],
                unit="ops",
            )
        )
        .with_panel(
            series_panel(
                "Embedding latency p95",
                "Time to embed a search query and a worker batch (fallback included).",
                [
                    Query(
                        "histogram_quantile(0.95, sum by (le, purpose) "
                        f"(rate(task_embedding_duration_seconds_bucket{{{TASK}}}[{RATE}])))",
                        "{{purpose}}",
                    )
                ],
                unit="s",
            )
        )
        .with_panel(
            series_panel(
                "Embedding backlog",
                "Tasks waiting to be embedded, the wait of the oldest (TaskEmbeddingBacklog "
                "at 10 minutes for 15 minutes) and tasks embedded per second.",
                [
                    Query(f"max(task_embedding_backlog{{{TASK}}})", "waiting"),
                    Query(f"max(task_embedding_backlog_age_seconds{{{TASK}}})", "oldest (s)"),
                    Query(f"sum(rate(task_embedded_total{{{TASK}}}[{RATE}]))", "embedded/s"),
                ],
            )
        )
        .with_row(dashboard.Row("Requests and errors"))
        .with_panel(
            series_panel(
                "Server failures by operation",
                "RPCs per second ending in INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED, UNKNOWN "
                "or DATA_LOSS, per service and method; 0 for methods without failures.",
                [
                    Query(
                        f"sum by (job, grpc_method) (rate(grpc_server_handled_total"
                        f"{{{OUR_JOBS},{SERVER_FAILURES}}}[{RATE}]))\n"
                        "or on (job, grpc_method)\n"
                        "0 * sum by (job, grpc_method) (rate(grpc_server_handled_total"
                        f"{{{OUR_JOBS}}}[{RATE}]))",
                        "{{job}} {{grpc_method}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "Errors by MHV code",
                "Every error a caller got, by MHV code (docs/errors/): caller mistakes and "
                "server failures alike; 0 for services without errors.",
                [
                    Query(
                        f"sum by (job, error_code) (rate(mhv_errors_total{{{OUR_JOBS}}}[{RATE}]))"
                        f"\nor on (job)\n{ZERO_PER_JOB}",
                        "{{job}} {{error_code}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "Requests by service",
                "RPCs per second per service, every method and outcome.",
                [
                    Query(
                        f"sum by (job) (rate(grpc_server_handled_total{{{OUR_JOBS}}}[{RATE}]))",
                        "{{job}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "RPC latency p95 by operation",
                "95th percentile of grpc_server_handling_seconds per service and method.",
                [
                    Query(
                        "histogram_quantile(0.95, sum by (job, grpc_method, le) (rate("
                        f"grpc_server_handling_seconds_bucket{{{OUR_JOBS}}}[{RATE}])))",
                        "{{job}} {{grpc_method}}",
                    )
                ],
                unit="s",
            )
        )
        .with_panel(
            series_panel(
                "Refused calls (security log)",
                "Calls refused as UNAUTHENTICATED (MHV-004) or PERMISSION_DENIED (MHV-005) per "
                "service, method and reason; each is one line of the mhv.security log. "
                "AuthorizationRefusalsHigh warns above one per second.",
                [
                    Query(
                        "sum by (job, method, reason) (rate(mhv_authz_denied_total"
                        f"{{{OUR_JOBS}}}[{RATE}]))\nor on (job)\n{ZERO_PER_JOB}",
                        "{{job}} {{method}} {{reason}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "Rate-limit rejections",
                "Requests refused with MHV-006 per service and method class; 0 when none.",
                [
                    Query(
                        "sum by (job, service, method_class) (rate(rate_limit_rejections_total"
                        f"{{{OUR_JOBS}}}[{RATE}]))\nor on (job)\n{ZERO_PER_JOB}",
                        "{{job}} {{method_class}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "Admission: requests in progress and shed",
                "Requests each service holds in progress (all listeners and processes), and "
                "requests shed at the door per second: overloaded (MHV-017) or draining "
                "(MHV-016).",
                [
                    Query(
                        f"sum by (job) (admission_in_flight{{{OUR_JOBS}}})",
                        "{{job}} in progress",
                    ),
                    Query(
                        "sum by (job, reason) (rate(admission_rejections_total"
                        f"{{{OUR_JOBS}}}[{RATE}]))\nor on (job)\n{ZERO_PER_JOB}",
                        "{{job}} shed {{reason}}",
                    ),
                ],
            )
        )
        .with_panel(
            series_panel(
                "Rate-limit storage (Redis) reachable",
                "1 while every process of the service reaches the shared rate-limit storage, 0 "
                "while one does not (limits counted per process meanwhile; RateLimitStorageDown).",
                [
                    Query(
                        f"min by (job) (rate_limit_storage_up{{{OUR_JOBS}}})",
                        "{{job}}",
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Webhook deliveries by outcome",
                "What the gateway did with each delivery, per source: accepted, duplicate, "
                "refused (signature, timestamp, size, rate) or error.",
                [
                    Query(
                        "sum by (source, outcome) (rate(webhook_deliveries_total"
                        f"{{{WEBHOOK}}}[{RATE}]))",
                        "{{source}} {{outcome}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            series_panel(
                "Webhook acknowledgement latency",
                "p95 time from receiving a delivery to answering it, per source; senders "
                "retry deliveries that are not acknowledged within their timeout.",
                [
                    Query(
                        "histogram_quantile(0.95, sum by (source, le) (rate("
                        f"webhook_ack_duration_seconds_bucket{{{WEBHOOK}}}[{RATE}])))",
                        "{{source}}",
                    )
                ],
                unit="s",
            )
        )
        .with_panel(
            series_panel(
                "Webhook secrets in use",
                "Which configured secret verified each source's deliveries: during a "
                "rotation, traffic moves to the new key before the old one is removed.",
                [
                    Query(
                        "sum by (source, key) (rate(webhook_secret_matches_total"
                        f"{{{WEBHOOK}}}[{RATE}]))",
                        "{{source}} key {{key}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_row(dashboard.Row("Database"))
        .with_panel(
            series_panel(
                "Connection pool: in use and size",
                "database_connections (checked out) against database_pool_size per service "
                "and pool, all replicas together.",
                [
                    Query(
                        'sum by (job, pool) (database_connections{database="postgresql"})',
                        "{{job}} {{pool}} in use",
                    ),
                    Query(
                        'sum by (job, pool) (database_pool_size{database="postgresql"})',
                        "{{job}} {{pool}} size",
                    ),
                ],
            )
        )
        .with_panel(
            series_panel(
                "Connection pool utilisation",
                "Busiest replica's share of its pool in use; DatabaseConnectionPoolExhausted "
                "pages above 90 % for 5 minutes.",
                [
                    Query(
                        'max by (job, pool) (database_connections{database="postgresql"}\n/\n'
                        'database_pool_size{database="postgresql"})',
                        "{{job}} {{pool}}",
                    )
                ],
                unit="percentunit",
                thresholds=[(None, "green"), (0.9, "red")],
            )
        )
        .with_row(dashboard.Row("Outbox, inbox and sagas"))
        .with_panel(
            series_panel(
                "Backlog depth",
                "Audit events waiting in the task and gateway outboxes; webhook deliveries in "
                "the inbox by state.",
                [
                    Query(f"max by (job) (task_outbox_depth{{{TASK}}})", "outbox"),
                    Query(f"max(webhook_outbox_depth{{{WEBHOOK}}})", "gateway outbox"),
                    Query(f"max by (state) (webhook_inbox_depth{{{WEBHOOK}}})", "inbox {{state}}"),
                ],
            )
        )
        .with_panel(
            series_panel(
                "Backlog age",
                "Age of the oldest undelivered audit event and of the oldest unprocessed "
                "webhook; alerts at 5 minutes for 10 minutes.",
                [
                    Query(f"max(task_outbox_lag_seconds{{{TASK}}})", "outbox"),
                    Query(f"max(webhook_outbox_lag_seconds{{{WEBHOOK}}})", "gateway outbox"),
                    Query(f"max(webhook_inbox_lag_seconds{{{WEBHOOK}}})", "inbox"),
                ],
                unit="s",
                thresholds=[(None, "green"), (300, "red")],
            )
        )
        .with_panel(
            series_panel(
                "Audit delivery",
                "Outbox events delivered to the audit service and delivery attempts that "
                "failed; audit events recorded (or recognised as duplicates).",
                [
                    Query(f"sum(rate(task_outbox_delivered_total{{{TASK}}}[{RATE}]))", "delivered"),
                    Query(
                        f"sum(rate(task_outbox_delivery_failures_total{{{TASK}}}[{RATE}]))",
                        "delivery failures",
                    ),
                    Query(
                        f"sum(rate(webhook_outbox_delivered_total{{{WEBHOOK}}}[{RATE}]))",
                        "gateway delivered",
                    ),
                    Query(
                        f"sum(rate(webhook_outbox_delivery_failures_total{{{WEBHOOK}}}[{RATE}]))",
                        "gateway delivery failures",
                    ),
                    Query(
                        f"sum by (result) (rate(audit_events_recorded_total{{{AUDIT}}}[{RATE}]))",
                        "audit {{result}}",
                    ),
                ],
                unit="ops",
            )
        )
        .with_panel(
            series_panel(
                "Audit chain verifications",
                "Hash chain verifications by result; any `broken` pages (AuditChainBroken).",
                [
                    Query(
                        "sum by (result) (rate(audit_chain_verifications_total"
                        f"{{{AUDIT}}}[{RATE}]))",
                        "{{result}}",
                    )
                ],
                unit="ops",
            )
        )
        .with_panel(
            stat_panel(
                "Audit chain last verified",
                "Time since an audit service last verified the whole hash chain intact; "
                "AuditChainVerificationStale warns past 3 hours.",
                [
                    Query(
                        "time() - max((audit_chain_last_verified_timestamp_seconds"
                        f"{{{AUDIT}}} > 0) or on (instance) process_start_time_seconds"
                        f"{{{AUDIT}}})",
                        "since last intact verification (or start)",
                    )
                ],
                unit="s",
                thresholds=[(None, "green"), (3600 * 2, "orange"), (3600 * 3, "red")],
            )
        )
        .with_panel(
            series_panel(
                "Saga outcomes",
                "Webhook sagas finished per second: completed, ignored, compensated, "
                "dead-lettered.",
                [
                    Query(
                        f"sum by (outcome) (rate(webhook_saga_total{{{WEBHOOK}}}[{RATE}]))",
                        "{{outcome}}",
                    )
                ],
                unit="ops",
            )
        )
        .with_row(dashboard.Row("Targets and alerts"))
        .with_panel(
            stat_panel(
                "Targets up",
                "1 when Prometheus scraped the target on its last attempt.",
                [Query(f"up{{{OUR_JOBS}}}", "{{job}} {{instance}}")],
                unit="none",
                thresholds=[(None, "red"), (1, "green")],
                width=24,
                height=4,
            )
        )
        .with_panel(
            table_panel(
                "Active alerts",
                "Every alert firing now. The Watchdog is always here: if it is missing, "
                "alerting itself is broken.",
                [Query('ALERTS{alertstate="firing"}')],
            )
        )
    )


def capacity_planning_dashboard() -> dashboard.Dashboard:
    """How much we handle and store, and when we will run out."""
    return (
        _base(
            "mhv-capacity-planning",
            "Mahavishnu / Capacity planning",
            "Volume, storage and latency trends, and where storage is heading.",
            "now-30d",
        )
        .with_row(dashboard.Row("Volume"))
        .with_panel(
            series_panel(
                "Tasks created per day",
                "Successful task creations over the preceding 24 hours, per repository.",
                [
                    Query(
                        "sum by (repository) (increase(task_creation_total"
                        f'{{{TASK},status="success"}}[1d]))',
                        "{{repository}}",
                    )
                ],
            )
        )
        .with_panel(
            series_panel(
                "Requests per service",
                "RPCs per second per service over the preceding hour, and webhook deliveries.",
                [
                    Query(
                        f"sum by (job) (rate(grpc_server_handled_total{{{OUR_JOBS}}}[1h]))",
                        "{{job}} RPCs",
                    ),
                    Query(
                        f"sum(rate(webhook_requests_total{{{WEBHOOK}}}[1h]))",
                        "webhook deliveries",
                    ),
                ],
                unit="reqps",
            )
        )
        .with_row(dashboard.Row("Storage"))
        .with_panel(
            series_panel(
                "Database size by schema",
                "database_size_bytes per service schema.",
                [Query("max by (schema) (database_size_bytes)", "{{schema}}")],
                unit="bytes",
            )
        )
        .with_panel(
            series_panel(
                "Database size projected 30 days ahead",
                "predict_linear over the preceding 7 days of each schema's size: where the "
                "current growth leads in 30 days.",
                [
                    Query(
                        "max by (schema) (predict_linear(database_size_bytes[7d], 30 * 86400))",
                        "{{schema}} in 30 days",
                    )
                ],
                unit="bytes",
            )
        )
        .with_panel(
            series_panel(
                "Webhook retention purges",
                "Dedup records (kept 4 days) and finished deliveries (kept 30 days) deleted per "
                "hour: the gateway's storage held steady by its retention jobs.",
                [
                    Query(
                        f"sum(increase(webhook_dedup_purged_total{{{WEBHOOK}}}[1h]))",
                        "dedup records",
                    ),
                    Query(
                        f"sum(increase(webhook_deliveries_purged_total{{{WEBHOOK}}}[1h]))",
                        "finished deliveries",
                    ),
                ],
            )
        )
        .with_panel(
            bar_panel(
                "Projected size in 30 days",
                "Today's projection per schema.",
                [
                    Query(
                        "max by (schema) (predict_linear(database_size_bytes[7d], 30 * 86400))",
                        "{{schema}}",
                        instant=True,
                    )
                ],
                unit="bytes",
                thresholds=[(None, "green")],
                width=24,
                height=6,
            )
        )
        .with_row(dashboard.Row("Query performance"))
        .with_panel(
            series_panel(
                "Task query latency p95",
                "95th percentile of the task service's read and search RPCs over the "
                "preceding hour.",
                [
                    Query(
                        "histogram_quantile(0.95, sum by (grpc_method, le) (rate("
                        f"grpc_server_handling_seconds_bucket{{{TASK},"
                        'grpc_method=~"GetTask|ListTasks|SearchTasks"}[1h])))',
                        "{{grpc_method}}",
                    )
                ],
                unit="s",
            )
        )
        .with_panel(
            series_panel(
                "Service latency p99",
                "99th percentile of every RPC per service over the preceding hour.",
                [
                    Query(
                        "histogram_quantile(0.99, sum by (job, le) (rate("
                        f"grpc_server_handling_seconds_bucket{{{OUR_JOBS}}}[1h])))",
                        "{{job}}",
                    )
                ],
                unit="s",
            )
        )
        .with_row(dashboard.Row("Headroom"))
        .with_panel(
            series_panel(
                "Peak connection pool use per day",
                "Highest share of a pool in use over the preceding day; sustained values "
                "near 90 % mean a bigger pool or more replicas.",
                [
                    Query(
                        "max by (job, pool) (max_over_time(database_connections"
                        '{database="postgresql"}[1d])\n/\n'
                        'database_pool_size{database="postgresql"})',
                        "{{job}} {{pool}}",
                    )
                ],
                unit="percentunit",
                thresholds=[(None, "green"), (0.9, "red")],
            )
        )
        .with_panel(
            series_panel(
                "Rate-limit rejections per day",
                "Requests refused by the rate limiter over the preceding day, per method "
                "class: callers hitting the limits; 0 when none.",
                [
                    Query(
                        "sum by (job, method_class) (increase(rate_limit_rejections_total"
                        f"{{{OUR_JOBS}}}[1d]))\nor on (job)\n{ZERO_PER_JOB}",
                        "{{job}} {{method_class}}",
                    )
                ],
            )
        )
    )


BUILDERS = {
    "slo.json": slo_dashboard,
    "operational-health.json": operational_health_dashboard,
    "capacity-planning.json": capacity_planning_dashboard,
}


def _number_panels(board: dict[str, Any]) -> dict[str, Any]:
    """Give every panel a stable id, in layout order, as Grafana expects."""
    next_id = 1
    for panel in _walk_panels(board.get("panels", [])):
        panel["id"] = next_id
        next_id += 1
    return board


def render(board: dashboard.Dashboard) -> str:
    """The dashboard's JSON text."""
    data = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return json.dumps(_number_panels(data), indent=2, ensure_ascii=False) + "\n"


def expected() -> dict[Path, str]:
    """Every file deploy/grafana/dashboards/ should hold, with its content."""
    return {DASHBOARDS_DIR / name: render(build()) for name, build in BUILDERS.items()}


# Reading the committed dashboards, for tests and tools.


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL target of one panel of a dashboard."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool

    def promql(self, *, rate_interval: str = "1m", interval: str = "15s") -> str:
        """The query as Prometheus will get it from Grafana (see `grafana_to_promql`)."""
        return grafana_to_promql(self.expr, rate_interval=rate_interval, interval=interval)


_GRAFANA_VARIABLE = re.compile(r"\$\{?(__[a-z_]+|[A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}?")


def grafana_to_promql(expr: str, *, rate_interval: str = "1m", interval: str = "15s") -> str:
    """`expr` with Grafana's built-in interval variables replaced by concrete durations.

    Raises:
        ValueError: The query uses a variable other than ``$__rate_interval`` and
            ``$__interval``, which Prometheus could not be given a value for here.

    """
    values = {"__rate_interval": rate_interval, "__interval": interval}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"unsupported Grafana variable ${name} in: {expr}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(substitute, expr)


def _walk_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Any]:
    for panel in panels:
        yield panel
        # Collapsed rows keep their panels inside the row.
        yield from _walk_panels(panel.get("panels", []))


def panel_queries(board: Mapping[str, Any]) -> list[PanelQuery]:
    """Every Prometheus target of every panel of a dashboard's JSON model."""
    found = []
    for panel in _walk_panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" in target:
                found.append(
                    PanelQuery(
                        dashboard=str(board.get("title", "")),
                        panel=str(panel.get("title", "")),
                        ref_id=str(target.get("refId", "")),
                        expr=str(target["expr"]),
                        instant=bool(target.get("instant", False)),
                    )
                )
    return found


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    """File name -> JSON model of every committed dashboard."""
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards, or with --check report drift."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if dashboards are stale")
    args = parser.parse_args(argv)
    return sync(expected(), DASHBOARDS_DIR, "*.json", check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
