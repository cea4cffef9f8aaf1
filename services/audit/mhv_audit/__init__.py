"""The audit service: append-only, hash-chained log of every task change.

Layers, top to bottom: `_edge` (gRPC), `_log` with `_events`, `_chain` and `_verify` (the
domain; `_schedule` runs its periodic verification), `_store` (SQL). `_metrics` holds the
service's own metrics, `app` wires everything into a running service. See
docs/architecture.md.
"""

from mhv_audit._chain import (
    ENCODING_VERSION,
    GENESIS_HASH,
    ChainedEvent,
    ChainScanner,
    NewEvent,
    StoredRow,
    canonical_json,
    encode_record,
    jcs_number,
    link,
    row_hash,
)
from mhv_audit._edge import AuditServicer
from mhv_audit._events import (
    EVENT_SUBJECTS,
    EVENT_TYPES,
    MAX_BATCH_EVENTS,
    SUBJECT_KINDS,
    EventInput,
    prepare_batch,
)
from mhv_audit._log import AuditLog, EventPage, ListRequest, RecordOutcome, Verification
from mhv_audit._metrics import SchemaSizeSampler
from mhv_audit._schedule import ScheduledVerification
from mhv_audit._store import AuditStore, ChainHead, ListFilter
from mhv_audit._verify import BreakKind, ChainBreak, Facts, classify

__all__ = [
    "ENCODING_VERSION",
    "EVENT_SUBJECTS",
    "EVENT_TYPES",
    "GENESIS_HASH",
    "MAX_BATCH_EVENTS",
    "SUBJECT_KINDS",
    "AuditLog",
    "AuditServicer",
    "AuditStore",
    "BreakKind",
    "ChainBreak",
    "ChainHead",
    "ChainScanner",
    "ChainedEvent",
    "EventInput",
    "EventPage",
    "Facts",
    "ListFilter",
    "ListRequest",
    "NewEvent",
    "RecordOutcome",
    "ScheduledVerification",
    "SchemaSizeSampler",
    "StoredRow",
    "Verification",
    "canonical_json",
    "classify",
    "encode_record",
    "jcs_number",
    "link",
    "prepare_batch",
    "row_hash",
]
