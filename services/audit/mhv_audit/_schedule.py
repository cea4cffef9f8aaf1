"""The audit service's own periodic check of its whole hash chain.

A broken chain must not wait for someone to ask: every run counts in
``audit_chain_verifications_total`` and a broken one logs MHV-400, which is what the
AuditChainBroken alert watches.
"""

from __future__ import annotations

from mhv_audit._log import AuditLog
from mhv_audit._metrics import CHAIN_VERIFICATIONS
from mhv_common.periodic import Periodic


class ScheduledVerification(Periodic):
    """Verifies the whole chain at start and then every `interval` seconds.

    Args:
        log: The audit log to verify.
        interval: Seconds between the end of one run and the start of the next.
        timeout: Upper bound on one run (a million rows take seconds).

    """

    name = "chain-verification"

    def __init__(self, log: AuditLog, *, interval: float, timeout: float = 1800.0) -> None:
        super().__init__(interval=interval, deadline=timeout)
        self._log = log

    async def tick(self) -> None:
        """One verification of the whole chain (outcome in metrics and logs)."""
        try:
            await self._log.verify()
        except Exception:
            # A verification that never finishes must not look like a quiet, healthy chain.
            CHAIN_VERIFICATIONS.labels("error").inc()
            raise
