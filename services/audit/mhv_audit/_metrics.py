"""The audit service's own metrics, and the worker that samples the schema's size."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from mhv_audit._store import AuditStore
from mhv_common.db import DATABASE_SIZE_BYTES as DATABASE_SIZE
from mhv_common.periodic import Periodic

EVENTS_RECORDED = Counter(
    "audit_events_recorded_total",
    "Events RecordEvents acknowledged: stored now (recorded) or already stored (duplicate).",
    ["result"],
)
CHAIN_VERIFICATIONS = Counter(
    "audit_chain_verifications_total",
    "Chain verifications, by outcome: ok; broken (a link failed; see MHV-400); error (the "
    "scheduled run could not finish).",
    ["result"],
)
LAST_VERIFIED = Gauge(
    "audit_chain_last_verified_timestamp_seconds",
    "Unix time at which a verification of the whole chain last found it intact (0: never since "
    "this process started). The AuditChainVerificationStale alert watches it.",
    # Of several processes, the latest verification by any (one that ended since included).
    multiprocess_mode="max",
)
for _result in ("recorded", "duplicate"):
    EVENTS_RECORDED.labels(_result)
for _result in ("ok", "broken", "error"):
    CHAIN_VERIFICATIONS.labels(_result)

AUDIT_SCHEMA = "audit"


class SchemaSizeSampler(Periodic):
    """Refreshes ``database_size_bytes{schema="audit"}`` every `interval` seconds.

    One catalog query summing ``pg_total_relation_size`` over the schema's few tables: it reads
    file sizes, never table contents, so it is cheap at any table size. When a sample fails the
    gauge keeps its last value; a database outage shows in the RPC errors and pool metrics.
    """

    name = "schema-size"

    def __init__(self, store: AuditStore, *, interval: float = 60.0, timeout: float = 5.0):
        super().__init__(interval=interval, deadline=timeout)
        self._store = store
        self._timeout = timeout

    async def tick(self) -> None:
        """Take one sample now."""
        size = await self._store.schema_size(AUDIT_SCHEMA, timeout=self._timeout)
        DATABASE_SIZE.labels(AUDIT_SCHEMA).set(size)
