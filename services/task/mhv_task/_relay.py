"""The outbox relay: delivers committed task events to the audit service, in order, at least once.

Each round claims the oldest undelivered events with ``SELECT ... FOR UPDATE SKIP LOCKED``
(other replicas' claims are skipped, never waited for), sends them in one RecordEvents call with
a deadline, marks them delivered and commits. A crash anywhere before the commit releases the
claim and another relay sends the batch again; the audit service deduplicates by event id, so
every event is recorded exactly once. Events of one task are never sent out of order (see
`_store.claim_pending_events`). While the audit service is down, events wait in the outbox and
the relay backs off exponentially; task RPCs are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import signal
import time

from google.protobuf import struct_pb2, timestamp_pb2
from prometheus_client import Counter, Gauge

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_common import context
from mhv_common.auth import ServiceCredentials
from mhv_common.client import Peer, service_channel
from mhv_common.db import DATABASE_SIZE_BYTES, Database
from mhv_common.periodic import Periodic
from mhv_task import _store as store

logger = logging.getLogger(__name__)

OUTBOX_DEPTH = Gauge("task_outbox_depth", "Audit events committed but not yet delivered.")
OUTBOX_LAG = Gauge(
    "task_outbox_lag_seconds", "Age of the oldest undelivered audit event (0 when none)."
)
OUTBOX_DELIVERED = Counter("task_outbox_delivered_total", "Audit events delivered.")
OUTBOX_FAILURES = Counter(
    "task_outbox_delivery_failures_total", "Relay rounds that failed and will be retried."
)

_MAX_BACKOFF_SECONDS = 5.0


def to_record(row: store.OutboxRow) -> audit_pb2.EventRecord:
    """An outbox row as the audit service's EventRecord."""
    details = struct_pb2.Struct()
    details.update(row["details"])
    occurred = timestamp_pb2.Timestamp()
    occurred.FromDatetime(row["occurred_at"])
    return audit_pb2.EventRecord(
        event_id=str(row["event_id"]),
        task_id=row["task_id"],
        event_type=row["event_type"],
        user_id=str(row["user_id"]),
        details=details,
        occur_time=occurred,
        request_id=row["request_id"],
        traceparent=row["traceparent"],
    )


class OutboxRelay:
    """Background worker relaying outbox rows to AuditService.RecordEvents."""

    name = "outbox-relay"

    def __init__(
        self,
        db: Database,
        *,
        peer: Peer,
        credentials: ServiceCredentials,
        batch_size: int = 200,
        poll_interval: float = 0.05,
        rpc_timeout: float = 5.0,
        crash_after_send: bool = False,
    ) -> None:
        self._crash_after_send = crash_after_send
        self._db = db
        self._peer = peer
        self._credentials = credentials
        self._batch = batch_size
        self._poll = poll_interval
        self._rpc_timeout = rpc_timeout
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the current round and return."""
        self._stop.set()

    async def run(self) -> None:
        """Relay until stopped."""
        backoff = 0.0
        async with service_channel(self._peer) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            while not self._stop.is_set():
                try:
                    sent = await self.relay_once(stub)
                except Exception as exc:  # any failure is retried
                    OUTBOX_FAILURES.inc()
                    backoff = min(max(backoff * 2, 0.1), _MAX_BACKOFF_SECONDS)
                    logger.warning(
                        "outbox relay round failed; retrying",
                        extra={"error": type(exc).__name__, "retry_in_s": round(backoff, 2)},
                    )
                    await self._pause(backoff * random.uniform(0.5, 1.0))  # noqa: S311
                    continue
                backoff = 0.0
                if sent < self._batch:
                    await self._pause(self._poll)

    async def relay_once(self, stub: audit_pb2_grpc.AuditServiceStub) -> int:
        """Claim, send and mark one batch; returns how many events were delivered."""
        with context.deadline_scope(self._rpc_timeout * 2):
            async with self._db.transaction() as conn:
                rows = await store.claim_pending_events(conn, limit=self._batch)
                if not rows:
                    return 0
                await stub.RecordEvents(
                    audit_pb2.RecordEventsRequest(events=[to_record(r) for r in rows]),
                    timeout=context.time_left(cap=self._rpc_timeout),
                    metadata=self._credentials.metadata(),
                    wait_for_ready=True,
                )
                if self._crash_after_send:
                    # The worst moment to die: the events are recorded, not yet marked.
                    os.kill(os.getpid(), signal.SIGKILL)
                await store.mark_delivered(conn, [r["id"] for r in rows])
        OUTBOX_DELIVERED.inc(len(rows))
        return len(rows)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


class OutboxMonitor(Periodic):
    """Refreshes the backlog gauges and schema size, and purges old delivered events."""

    name = "outbox-monitor"

    def __init__(
        self,
        db: Database,
        *,
        interval: float = 2.0,
        keep_delivered: dt.timedelta = dt.timedelta(days=1),
    ) -> None:
        super().__init__(interval=interval, deadline=10.0)
        self._db = db
        self._keep = keep_delivered
        self._last_slow = 0.0

    async def tick(self) -> None:
        """Observe once; every minute also measure the schema and purge."""
        async with self._db.connection() as conn:
            depth, lag = await store.outbox_backlog(conn)
            OUTBOX_DEPTH.set(depth)
            OUTBOX_LAG.set(lag)
            if time.monotonic() - self._last_slow > 60:
                self._last_slow = time.monotonic()
                DATABASE_SIZE_BYTES.labels(schema="task").set(await store.schema_size(conn))
                await store.purge_delivered(conn, older_than=self._keep)
