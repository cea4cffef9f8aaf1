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
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from mhv_common import context
from mhv_common.db import Database
from mhv_common.periodic import Periodic
from mhv_task import _metrics as metrics
from mhv_task import _store as store
from mhv_task._events import PendingEvent

logger = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 5.0


class AuditSink(Protocol):
    """Where the relay sends events (`mhv_task._edge_audit.AuditClient`)."""

    async def record(self, events: Sequence[PendingEvent], *, timeout: float | None) -> None:
        """Record `events`, idempotently by event id, within `timeout`."""


class OutboxRelay:
    """Background worker relaying outbox rows to AuditService.RecordEvents.

    Args:
        db: The task service's pool.
        connect: Opens the connection to the audit service for the relay's lifetime.
        batch_size: Most events per round.
        poll_interval: Pause after a round that found fewer than `batch_size` events.
        rpc_timeout: Bound on one RecordEvents call.
        crash_after_send: Kill the process after a send, before marking (drills only).
    """

    name = "outbox-relay"

    def __init__(
        self,
        db: Database,
        *,
        connect: Callable[[], AbstractAsyncContextManager[AuditSink]],
        batch_size: int = 200,
        poll_interval: float = 0.05,
        rpc_timeout: float = 5.0,
        crash_after_send: bool = False,
    ) -> None:
        self._crash_after_send = crash_after_send
        self._db = db
        self._connect = connect
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
        async with self._connect() as audit:
            while not self._stop.is_set():
                try:
                    sent = await self.relay_once(audit)
                except Exception as exc:  # any failure is retried
                    metrics.outbox_round_failed()
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

    async def relay_once(self, audit: AuditSink) -> int:
        """Claim, send and mark one batch; returns how many events were delivered."""
        with context.deadline_scope(self._rpc_timeout * 2):
            async with self._db.transaction() as conn:
                claimed = await store.claim_pending_events(
                    conn, limit=self._batch, timeout=context.time_left()
                )
                if not claimed:
                    return 0
                await audit.record(claimed, timeout=context.time_left(cap=self._rpc_timeout))
                if self._crash_after_send:
                    # The worst moment to die: the events are recorded, not yet marked.
                    os.kill(os.getpid(), signal.SIGKILL)
                await store.mark_delivered(
                    conn, [e.id for e in claimed], timeout=context.time_left()
                )
        metrics.outbox_delivered(len(claimed))
        return len(claimed)

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
            metrics.outbox_backlog(*await store.outbox_backlog(conn, timeout=context.time_left()))
            if time.monotonic() - self._last_slow > 60:
                self._last_slow = time.monotonic()
                metrics.schema_size(await store.schema_size(conn, timeout=context.time_left()))
                await store.purge_delivered(
                    conn, older_than=self._keep, timeout=context.time_left()
                )
