"""The public surface of mhv_audit is what its __all__ says, and nothing goes missing."""

from __future__ import annotations

import mhv_audit

EXPECTED = {
    "ENCODING_VERSION",
    "EVENT_TYPES",
    "GENESIS_HASH",
    "MAX_BATCH_EVENTS",
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
}


def test_exports() -> None:
    assert set(mhv_audit.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(mhv_audit, name) is not None


def test_the_plan_event_types() -> None:
    assert {
        "task_created",
        "task_updated",
        "task_deleted",
        "task_assigned",
        "task_started",
        "task_completed",
        "task_cancelled",
        "task_blocked",
        "task_unblocked",
    } == mhv_audit.EVENT_TYPES
