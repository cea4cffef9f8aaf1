"""The backup exporter: backup, verification and WAL streaming state for Prometheus.

``mhv backup exporter`` runs beside the WAL receiver on the backup host and serves
``/metrics`` (default port 9104; Prometheus job ``mahavishnu-backup``). Every scrape reads the
state where it lives, so a number is never older than the scrape:

- the repository's catalogue (newest completed backup, its size and duration, the recovery
  window),
- the last verification reports (``verification/last.json``, ``last-success.json``),
- the WAL stream: ``pg_stat_replication`` on the primary (is the receiver streaming
  synchronously, how far behind), segments received but not yet archived, and segments Barman
  set aside as errors.

A scrape-time exporter rather than a textfile written by the batch commands: the WAL stream's
health changes between backups, and a scrape that fails is itself a signal (``up == 0``).
The alerts on these metrics (BackupTooOld, BackupVerificationFailed, WalArchivingFailing) are
generated from deploy/prometheus/slos.yaml.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mhv_cli.backup import RECEIVER_NAME, Repository, _query
from mhv_cli.verify import LAST_REPORT, LAST_SUCCESS

_SEGMENT = re.compile(r"^[0-9A-F]{24}$")


def _gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
    if value is not None:
        family = GaugeMetricFamily(name, doc)
        family.add_metric([], value)
        yield family


def _report_time(path: Path) -> tuple[float | None, dict[str, Any]]:
    if not path.exists():
        return None, {}
    report = json.loads(path.read_text())
    finished = report.get("finished_at")
    moment = dt.datetime.fromisoformat(finished).timestamp() if finished else None
    return moment, report


class BackupCollector(Collector):
    """Reads the repository and the primary on every scrape."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The metrics of one scrape."""
        repo = self._repo
        done = repo.completed()
        last = done[-1] if done else None
        yield from _gauge("mhv_backup_completed", "Completed backups in the repository.", len(done))
        if last is not None and last.end_time is not None:
            yield from _gauge(
                "mhv_backup_last_success_timestamp_seconds",
                "When the newest completed backup ended.",
                last.end_time.timestamp(),
            )
            yield from _gauge(
                "mhv_backup_last_size_bytes",
                "Size of the newest backup in the repository (compressed, encrypted).",
                last.size_bytes,
            )
            if last.begin_time is not None:
                yield from _gauge(
                    "mhv_backup_last_duration_seconds",
                    "How long the newest backup took.",
                    (last.end_time - last.begin_time).total_seconds(),
                )
            yield from _gauge(
                "mhv_backup_recovery_window_start_timestamp_seconds",
                "The earliest moment a point-in-time restore can reach.",
                repo.window().start.timestamp(),
            )
        ran, report = _report_time(repo.verification_dir / LAST_REPORT)
        succeeded, _ = _report_time(repo.verification_dir / LAST_SUCCESS)
        yield from _gauge(
            "mhv_backup_verification_last_run_timestamp_seconds",
            "When the last backup verification finished.",
            ran,
        )
        if ran is not None:
            yield from _gauge(
                "mhv_backup_verification_last_ok",
                "1 when the last backup verification passed every check, else 0.",
                1.0 if report.get("ok") else 0.0,
            )
        yield from _gauge(
            "mhv_backup_verification_last_success_timestamp_seconds",
            "When a backup verification last passed every check.",
            succeeded,
        )
        yield from self._wal()

    def _wal(self) -> Iterator[GaugeMetricFamily]:
        repo = self._repo
        streaming, lag = 0.0, None
        with contextlib.suppress(Exception):
            row = _query(
                repo.primary(),
                "SELECT coalesce(max(CASE WHEN sync_state = 'sync' AND state = 'streaming'"  # noqa: S608  # nosec B608: a constant statement
                " THEN 1 ELSE 0 END), 0) || ' ' || coalesce(max(pg_wal_lsn_diff("
                "pg_current_wal_lsn(), flush_lsn)), -1)"
                f" FROM pg_stat_replication WHERE application_name = '{RECEIVER_NAME}'",
            )
            flag, behind = row.split()
            streaming = float(flag)
            lag = float(behind) if float(behind) >= 0 else None
        yield from _gauge(
            "mhv_wal_receiver_streaming",
            "1 when the primary names the WAL receiver its synchronous standby and streams to it.",
            streaming,
        )
        yield from _gauge(
            "mhv_wal_receiver_lag_bytes",
            "WAL the primary wrote that the receiver has not flushed yet.",
            lag,
        )
        received = repo.last_wal_time()
        yield from _gauge(
            "mhv_wal_last_received_timestamp_seconds",
            "When WAL last reached the repository.",
            received.timestamp() if received else None,
        )
        stream = repo.server_dir / "streaming"
        unarchived = (
            sum(1 for p in stream.iterdir() if _SEGMENT.match(p.name)) if stream.is_dir() else 0
        )
        yield from _gauge(
            "mhv_wal_unarchived_segments",
            "Complete WAL segments received but not yet archived (encrypted) by Barman.",
            unarchived,
        )
        errors = repo.server_dir / "errors"
        yield from _gauge(
            "mhv_wal_archive_errors",
            "WAL files Barman could not archive and set aside in its errors folder.",
            sum(1 for _ in errors.iterdir()) if errors.is_dir() else 0,
        )


def registry_for(repo: Repository) -> CollectorRegistry:
    """A registry holding only the backup collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackupCollector(repo))
    return registry


def serve(repo: Repository, *, host: str = "127.0.0.1", port: int = 9104) -> int:
    """Serve the metrics until SIGTERM or SIGINT."""
    repo.require()
    server, thread = start_http_server(port, addr=host, registry=registry_for(repo))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"backup metrics on http://{host}:{port}/metrics (pid {os.getpid()})", flush=True)
    stop.wait()
    server.shutdown()
    thread.join()
    return 0
