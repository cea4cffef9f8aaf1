"""The task service's outbox relay and monitor.

The relay is the shared one (`mhv_common.outbox.OutboxRelay`: claims committed events in
order, sends them to AuditService.RecordEvents, marks them delivered, at least once; the audit
service records each once), counting into the task outbox metrics. The monitor refreshes the
backlog gauges and the schema size, and purges delivered events.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from mhv_common import context, outbox
from mhv_common.db import Database
from mhv_common.periodic import Periodic
from mhv_task import _metrics as metrics
from mhv_task import _store as store


class OutboxRelay(outbox.OutboxRelay):
    """`mhv_common.outbox.OutboxRelay` over the task outbox, counted by the task metrics."""

    def __init__(self, db: Database, **options: Any) -> None:
        super().__init__(
            db,
            on_delivered=metrics.outbox_delivered,
            on_failed=metrics.outbox_round_failed,
            **options,
        )


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
            metrics.outbox_backlog(*await outbox.outbox_backlog(conn, timeout=context.time_left()))
            if time.monotonic() - self._last_slow > 60:
                self._last_slow = time.monotonic()
                metrics.schema_size(await store.schema_size(conn, timeout=context.time_left()))
                await outbox.purge_delivered(
                    conn, older_than=self._keep, timeout=context.time_left()
                )
