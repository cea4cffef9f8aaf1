"""The audit service's own periodic check of its whole hash chain.

A broken chain must not wait for someone to ask: every run counts in
``audit_chain_verifications_total`` and a broken one logs MHV-400, which is what the
AuditChainBroken alert watches.
"""

from __future__ import annotations

import asyncio
import logging

from mhv_audit._log import AuditLog
from mhv_common import context

logger = logging.getLogger(__name__)


class ScheduledVerification:
    """Verifies the whole chain now and then every `interval` seconds.

    Args:
        log: The audit log to verify.
        interval: Seconds between the end of one run and the start of the next.
        timeout: Upper bound on one run (a million rows take seconds).

    """

    name = "chain-verification"

    def __init__(self, log: AuditLog, *, interval: float, timeout: float = 1800.0) -> None:
        self._log = log
        self._interval = interval
        self._timeout = timeout
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        """Verify until `stop`; a run that fails is logged and the schedule goes on."""
        while not self._stopping.is_set():
            try:
                with context.deadline_scope(self._timeout):
                    await self._log.verify()
            except Exception as exc:
                # The outcome metric stays put, so a check that keeps failing shows as missing
                # verifications; it must never take the service down.
                logger.warning("scheduled chain verification failed", extra={"error": repr(exc)})
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            except TimeoutError:
                continue

    def stop(self) -> None:
        """Ask `run` to return (a run in progress is cancelled by the runtime's grace period)."""
        self._stopping.set()
