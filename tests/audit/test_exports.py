"""The public surface of mhv_audit is what its __all__ says, and nothing goes missing."""

from __future__ import annotations

import mhv_audit

EXPECTED = {
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
}


def test_exports() -> None:
    assert set(mhv_audit.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(mhv_audit, name) is not None


def test_the_plan_event_types() -> None:
    """The plan's task events, and the other operations audited since (each with its subject)."""
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
    } == {t for t, kind in mhv_audit.EVENT_SUBJECTS.items() if kind == "task"}
    assert {
        "user_created": "user",
        "user_deactivated": "user",
        "user_deleted": "user",
        "delivery_retried": "delivery",
        "signing_key_generated": "credential",
        "jwks_published": "credential",
        "webhook_secret_rotated": "credential",
        "db_password_rotated": "credential",
    }.items() <= mhv_audit.EVENT_SUBJECTS.items()
    assert frozenset(mhv_audit.EVENT_SUBJECTS) == mhv_audit.EVENT_TYPES
    assert {"task", "user", "delivery", "credential"} == mhv_audit.SUBJECT_KINDS
