"""Background jobs of the gateway: the dedup purge and the inbox gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mhv_common import context
from mhv_common.db import DATABASE_SIZE_BYTES as DATABASE_SIZE
from mhv_common.errors import MahavishnuError
from mhv_webhook._inbox import Inbox
from mhv_webhook._metrics import DEDUP_PURGED, INBOX_DEPTH, INBOX_LAG

logger = logging.getLogger(__name__)
_JOB_DEADLINE_SECONDS = 60.0


class _Periodic:
    """Runs `tick` every `interval` seconds until stopped; a failed tick is logged and retried."""

    name = "periodic"

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._stopping = asyncio.Event()

    async def tick(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        """Tick now, then every interval, until `stop`."""
        while not self._stopping.is_set():
            try:
                with context.deadline_scope(_JOB_DEADLINE_SECONDS):
                    await self.tick()
            except (MahavishnuError, OSError) as exc:
                # The database being briefly away is no reason to stop the job; next tick
                # tries again.
                logger.warning(
                    "background job failed", extra={"job": self.name, "error": repr(exc)}
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval)

    def stop(self) -> None:
        """Finish the current tick and return."""
        self._stopping.set()


class DedupPurger(_Periodic):
    """Deletes dedup records older than the retention (default 4 days)."""

    name = "dedup-purge"

    def __init__(self, inbox: Inbox, *, retention_seconds: float, interval: float) -> None:
        super().__init__(interval)
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


class InboxGauges(_Periodic):
    """Refreshes webhook_inbox_depth, webhook_inbox_lag_seconds and database_size_bytes."""

    name = "inbox-gauges"

    def __init__(self, inbox: Inbox, *, interval: float) -> None:
        super().__init__(interval)
        self._inbox = inbox

    async def tick(self) -> None:
        """Read the inbox statistics once."""
        stats = await self._inbox.stats(timeout=_JOB_DEADLINE_SECONDS)
        for state, count in stats.depth.items():
            INBOX_DEPTH.labels(state).set(count)
        INBOX_LAG.set(stats.oldest_pending_age_seconds)
        DATABASE_SIZE.labels("webhook").set(stats.schema_size_bytes)
