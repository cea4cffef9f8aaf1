"""The metric contract of the three services (docs/sre/metrics.md), as data, and an exporter.

`CONTRACT` lists every metric the rules and dashboards may read, with the labels each carries
and example label values. `ContractExporter` serves one service's share of it in the Prometheus
text format (``with ContractExporter("task").server() as http:``, scraped at ``http.address``),
advancing counters on every scrape, so that rules and dashboard queries can be run against a
real Prometheus before, and independently of, the services themselves.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mhv_tools.gen_rules import JOBS
from tests.observability.receivers import LocalHttpServer, QuietHandler

ALL = tuple(JOBS)  # "task", "audit", "webhook"
Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    """One metric family of the contract."""

    name: str
    kind: Kind
    labels: dict[str, tuple[str, ...]]
    services: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def series_names(self) -> set[str]:
        """Names of the series this family exposes."""
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_count", f"{self.name}_sum"}
        return {self.name}


GRPC_LABELS = {
    "grpc_service": ("mahavishnu.v1.Service",),
    "grpc_method": ("CreateTask", "SearchTasks", "GetTask"),
}
CONTRACT: tuple[Metric, ...] = (
    # Every service, from libs/common.
    Metric(
        "grpc_server_handled_total",
        "counter",
        {**GRPC_LABELS, "grpc_code": ("OK", "INVALID_ARGUMENT", "INTERNAL")},
        ALL,
    ),
    Metric(
        "grpc_server_handling_seconds",
        "histogram",
        GRPC_LABELS,
        ALL,
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    ),
    Metric(
        "mhv_errors_total", "counter", {**GRPC_LABELS, "error_code": ("MHV-003", "MHV-008")}, ALL
    ),
    Metric(
        "mhv_authz_denied_total",
        "counter",
        {
            "service": ("mahavishnu.task.v1.TaskService",),
            "method": ("GetTask", "CreateUser"),
            "reason": ("MHV-004", "MHV-005"),
        },
        ALL,
    ),
    Metric("database_connections", "gauge", {"database": ("postgresql",), "pool": ("main",)}, ALL),
    Metric("database_pool_size", "gauge", {"database": ("postgresql",), "pool": ("main",)}, ALL),
    Metric(
        "rate_limit_rejections_total",
        "counter",
        {"service": ("mahavishnu",), "method_class": ("create", "search")},
        ALL,
    ),
    Metric("database_size_bytes", "gauge", {"schema": ("{service}",)}, ALL),
    Metric("rate_limit_storage_up", "gauge", {"service": ("{service}",)}, ALL),
    Metric("admission_in_flight", "gauge", {"service": ("{service}",), "listener": ("grpc",)}, ALL),
    Metric(
        "admission_rejections_total",
        "counter",
        {"service": ("{service}",), "listener": ("grpc",), "reason": ("overloaded", "draining")},
        ALL,
    ),
    # Task service.
    Metric(
        "task_creation_total",
        "counter",
        {"repository": ("demo",), "status": ("success", "rejected", "error")},
        ("task",),
    ),
    Metric(
        "task_creation_duration_seconds",
        "histogram",
        {"repository": ("demo",)},
        ("task",),
        (0.05, 0.1, 0.5, 1.0, 5.0),
    ),
    Metric(
        "semantic_search_total", "counter", {"status": ("success", "rejected", "error")}, ("task",)
    ),
    # From prometheus_client's default process collector.
    Metric("process_start_time_seconds", "gauge", {}, ALL),
    Metric("task_outbox_depth", "gauge", {}, ("task",)),
    Metric("task_outbox_lag_seconds", "gauge", {}, ("task",)),
    Metric("task_outbox_delivered_total", "counter", {}, ("task",)),
    Metric("task_outbox_delivery_failures_total", "counter", {}, ("task",)),
    Metric("webhook_outbox_depth", "gauge", {}, ("webhook",)),
    Metric("webhook_outbox_lag_seconds", "gauge", {}, ("webhook",)),
    Metric("webhook_outbox_delivered_total", "counter", {}, ("webhook",)),
    Metric("webhook_outbox_delivery_failures_total", "counter", {}, ("webhook",)),
    Metric("task_embedding_backlog", "gauge", {}, ("task",)),
    Metric("task_embedding_backlog_age_seconds", "gauge", {}, ("task",)),
    Metric("task_embedding_remote_configured", "gauge", {}, ("task",)),
    Metric(
        "task_embedding_requests_total",
        "counter",
        {"purpose": ("query", "index"), "outcome": ("remote", "local_fallback", "error")},
        ("task",),
    ),
    Metric("task_embedded_total", "counter", {}, ("task",)),
    Metric(
        "task_embedding_duration_seconds",
        "histogram",
        {"purpose": ("query",)},
        ("task",),
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    ),
    # Audit service.
    Metric(
        "audit_events_recorded_total", "counter", {"result": ("recorded", "duplicate")}, ("audit",)
    ),
    Metric(
        "audit_chain_verifications_total",
        "counter",
        {"result": ("ok", "broken", "error")},
        ("audit",),
    ),
    Metric("audit_chain_last_verified_timestamp_seconds", "gauge", {}, ("audit",)),
    # Webhook gateway.
    Metric(
        "webhook_requests_total",
        "counter",
        {"source": ("github", "gitlab"), "code": ("202", "401", "500")},
        ("webhook",),
    ),
    Metric(
        "webhook_deliveries_total",
        "counter",
        {
            "source": ("github",),
            "outcome": (
                "accepted",
                "duplicate",
                "bad_signature",
                "bad_timestamp",
                "malformed",
                "too_large",
                "rate_limited",
                "error",
            ),
        },
        ("webhook",),
    ),
    Metric(
        "webhook_ack_duration_seconds",
        "histogram",
        {"source": ("github",)},
        ("webhook",),
        (0.01, 0.05, 0.1, 0.5, 1.0),
    ),
    Metric(
        "webhook_secret_matches_total",
        "counter",
        {"source": ("github",), "key": ("0", "1")},
        ("webhook",),
    ),
    Metric("webhook_inbox_depth", "gauge", {"state": ("pending", "processing")}, ("webhook",)),
    Metric("webhook_inbox_lag_seconds", "gauge", {}, ("webhook",)),
    Metric("webhook_dedup_purged_total", "counter", {}, ("webhook",)),
    Metric("webhook_deliveries_purged_total", "counter", {}, ("webhook",)),
    Metric(
        "webhook_saga_total",
        "counter",
        {"outcome": ("completed", "ignored", "compensated", "dead_letter")},
        ("webhook",),
    ),
)


# The backup exporter (`mhv backup exporter`, docs/dr/backups.md): its own scrape job on the
# backup host, read by the backup alerts. Not on the service dashboards: the services' live
# test has no backup host.
BACKUP = "backup"
BACKUP_METRICS: tuple[Metric, ...] = tuple(
    Metric(name, "gauge", {}, (BACKUP,))
    for name in (
        "mhv_backup_completed",
        "mhv_backup_last_success_timestamp_seconds",
        "mhv_backup_last_size_bytes",
        "mhv_backup_last_duration_seconds",
        "mhv_backup_recovery_window_start_timestamp_seconds",
        "mhv_backup_verification_last_run_timestamp_seconds",
        "mhv_backup_verification_last_ok",
        "mhv_backup_verification_last_success_timestamp_seconds",
        "mhv_wal_receiver_streaming",
        "mhv_wal_receiver_lag_bytes",
        "mhv_wal_last_received_timestamp_seconds",
        "mhv_wal_unarchived_segments",
        "mhv_wal_archive_errors",
    )
)


def series_names() -> set[str]:
    """Every series name the services and the backup exporter expose (besides `up`)."""
    return set().union(*(m.series_names() for m in (*CONTRACT, *BACKUP_METRICS)))


def _label_sets(metric: Metric, service: str) -> Iterator[dict[str, str]]:
    keys = list(metric.labels)
    for values in itertools.product(*(metric.labels[k] for k in keys)):
        yield {k: v.format(service=service) for k, v in zip(keys, values, strict=True)}


def _render(name: str, labels: dict[str, str], value: float) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {value!r}" if inner else f"{name} {value!r}"


@dataclass
class ContractExporter:
    """Serves `service`'s contract metrics on 127.0.0.1; each scrape is one more step of load."""

    service: str
    scrapes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def exposition(self) -> str:
        """The metrics text after `scrapes` steps: counters grow, gauges stay plausible."""
        step = self.scrapes
        lines = []
        for metric in (*CONTRACT, *BACKUP_METRICS):
            if self.service not in metric.services:
                continue
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for index, labels in enumerate(_label_sets(metric, self.service)):
                if metric.kind == "counter":
                    lines.append(_render(metric.name, labels, float(step * (index + 1))))
                elif metric.kind == "gauge":
                    lines.append(_render(metric.name, labels, self._gauge(metric.name, step)))
                else:
                    lines.extend(self._histogram(metric, labels, step))
        return "\n".join(lines) + "\n"

    @staticmethod
    def _gauge(name: str, step: int) -> float:
        if name == "database_pool_size":
            return 10.0
        if name == "database_connections":
            return float(2 + step % 3)
        if name == "database_size_bytes":
            return float(8_000_000 + 4096 * step)
        if name == "rate_limit_storage_up":
            return 1.0
        return float(step % 5)

    @staticmethod
    def _histogram(metric: Metric, labels: dict[str, str], step: int) -> Sequence[str]:
        # Each step observes one value in every bucket: a spread of latencies.
        out, cumulative = [], 0
        for bound in metric.buckets:
            cumulative += step
            out.append(_render(f"{metric.name}_bucket", {**labels, "le": repr(bound)}, cumulative))
        total = cumulative + step
        out.append(_render(f"{metric.name}_bucket", {**labels, "le": "+Inf"}, total))
        out.append(_render(f"{metric.name}_count", labels, total))
        out.append(_render(f"{metric.name}_sum", labels, sum(metric.buckets) * step))
        return out

    def server(self) -> LocalHttpServer:
        """An HTTP server answering every GET with the next `exposition`."""
        exporter = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                with exporter._lock:
                    exporter.scrapes += 1
                    body = exporter.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return LocalHttpServer(Handler)
