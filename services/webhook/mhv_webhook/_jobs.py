"""Background jobs of the gateway: the dedup and delivery purges, and the inbox gauges."""

from __future__ import annotations

import datetime as dt
import logging

from mhv_common.db import DATABASE_SIZE_BYTES as DATABASE_SIZE
from mhv_common.periodic import Periodic
from mhv_webhook._metrics import (
    DEDUP_PURGED,
    DELIVERIES_PURGED,
    INBOX_DEPTH,
    INBOX_LAG,
    OUTBOX_DEPTH,
    OUTBOX_LAG,
)
from mhv_webhook._store_inbox import Inbox
from mhv_webhook._store_saga import Sagas

logger = logging.getLogger(__name__)
_JOB_DEADLINE_SECONDS = 60.0


class DedupPurger(Periodic):
    """Deletes dedup records older than the retention (default 4 days).

    Also deletes the audit outbox's events a day after the audit service recorded them (kept
    that long for inspection, as the task service keeps its own).
    """

    name = "dedup-purge"

    def __init__(self, inbox: Inbox, *, retention_seconds: float, interval: float) -> None:
        super().__init__(interval=interval, deadline=_JOB_DEADLINE_SECONDS)
        self._inbox = inbox
        self._retention = retention_seconds

    async def tick(self) -> None:
        """Purge once."""
        deleted = await self._inbox.purge_dedup(
            retention_seconds=self._retention, timeout=_JOB_DEADLINE_SECONDS
        )
        DEDUP_PURGED.inc(deleted)
        if deleted:
            logger.info("dedup records purged", extra={"deleted": deleted})
        await self._inbox.purge_delivered_events(
            older_than=dt.timedelta(days=1), timeout=_JOB_DEADLINE_SECONDS
        )


class InboxGauges(Periodic):
    """Refreshes the inbox and outbox gauges (depth, lag) and database_size_bytes."""

    name = "inbox-gauges"

    def __init__(self, inbox: Inbox, *, interval: float) -> None:
        super().__init__(interval=interval, deadline=_JOB_DEADLINE_SECONDS)
        self._inbox = inbox

    async def tick(self) -> None:
        """Read the inbox statistics once."""
        stats = await self._inbox.stats(timeout=_JOB_DEADLINE_SECONDS)
        for state, count in stats.depth.items():
            INBOX_DEPTH.labels(state).set(count)
        INBOX_LAG.set(stats.oldest_pending_age_seconds)
        depth, lag = await self._inbox.outbox_backlog(timeout=_JOB_DEADLINE_SECONDS)
        OUTBOX_DEPTH.set(depth)
        OUTBOX_LAG.set(lag)
        DATABASE_SIZE.labels("webhook").set(stats.schema_size_bytes)


class DeliveryPurger(Periodic):
    """Deletes finished deliveries (with their bodies and saga logs) after their retention.

    Open deliveries (pending, processing, dead-lettered) are never purged; issue links outlive
    the delivery that made them.
    """

    name = "delivery-purge"

    def __init__(self, sagas: Sagas, *, retention_seconds: float, interval: float) -> None:
        super().__init__(interval=interval, deadline=_JOB_DEADLINE_SECONDS)
        self._sagas = sagas
        self._retention = retention_seconds

    async def tick(self) -> None:
        """Purge once."""
        deleted = await self._sagas.purge_finished(
            retention_seconds=self._retention, timeout=_JOB_DEADLINE_SECONDS
        )
        DELIVERIES_PURGED.inc(deleted)
        if deleted:
            logger.info("finished deliveries purged", extra={"deleted": deleted})
