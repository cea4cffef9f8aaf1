"""Incoming events: validation, redaction and canonicalisation, before anything is stored.

A batch is all or nothing: every violation of every event is collected and reported at once
(``events[3].event_id``, ...), and nothing of a batch with any violation is written. Details are
redacted again here (`mhv_common.redaction.redact_details` is idempotent): whatever the sender
did, no secret-looking value reaches the table or a log line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mhv_audit._chain import TASK_SUBJECT, NewEvent, canonical_json
from mhv_common.errors import FieldViolation, ValidationError
from mhv_common.ids import canonical_uuid
from mhv_common.redaction import redact_details
from mhv_common.timestamps import micros_of

EVENT_SUBJECTS: Mapping[str, str] = {
    **dict.fromkeys(
        (
            "task_created",
            "task_updated",
            "task_deleted",
            "task_assigned",
            "task_started",
            "task_completed",
            "task_cancelled",
            "task_blocked",
            "task_unblocked",
        ),
        TASK_SUBJECT,
    ),
    # The task service's user directory.
    **dict.fromkeys(("user_created", "user_deactivated", "user_deleted"), "user"),
    # The webhook gateway's admin API: a dead-lettered delivery sent back to the queue.
    "delivery_retried": "delivery",
    # `mhv keys` and `mhv secrets`: credentials made or replaced by an operator.
    **dict.fromkeys(
        (
            "signing_key_generated",
            "jwks_published",
            "webhook_secret_rotated",
            "db_password_rotated",
        ),
        "credential",
    ),
}
"""Every event type, and the kind of subject it is about."""
EVENT_TYPES = frozenset(EVENT_SUBJECTS)
SUBJECT_KINDS = frozenset(EVENT_SUBJECTS.values())
WRITER_SUBJECTS: Mapping[str, frozenset[str]] = {
    "service:task": frozenset({TASK_SUBJECT, "user"}),
    "service:webhook": frozenset({"delivery"}),
}
"""What each service's relay may record: events about the subjects it owns, nothing else."""
OPERATOR_SUBJECTS = frozenset({"credential"})
"""What an administrator may record directly (`mhv keys`, `mhv secrets`), as themselves."""
MAX_SUBJECT_ID_CHARS = 200
MAX_BATCH_EVENTS = 1000
MAX_DETAILS_CHARS = 64 * 1024
MAX_REQUEST_ID_CHARS = 128
_MAX_TASK_ID = 2**63 - 1

# W3C Trace Context: version-traceid-parentid-flags; later versions may append fields.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_PRINTABLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


@dataclass(frozen=True, slots=True)
class EventInput:
    """One event as the edge decoded it, not yet validated.

    Attributes:
        event_id: As sent.
        task_id: As sent.
        event_type: As sent.
        user_id: As sent.
        details: The details object, or None when absent.
        details_error: Why the edge could not decode the details (e.g. a NaN), if it could not.
        occur_time: (seconds, nanos) since the epoch, or None when absent.
        request_id: As sent.
        traceparent: As sent.
        subject_kind: As sent; empty means a task.
        subject_id: As sent; empty for a task.

    """

    event_id: str
    task_id: int
    event_type: str
    user_id: str
    details: Mapping[str, Any] | None
    details_error: str | None
    occur_time: tuple[int, int] | None
    request_id: str
    traceparent: str
    subject_kind: str = ""
    subject_id: str = ""


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a W3C ``traceparent``, or None when it is malformed."""
    match = _TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id


def checked_uuid(
    value: str, field: str, description: str, problems: list[FieldViolation]
) -> str | None:
    """`value` as a lowercase UUID, or None with its violation added to `problems`."""
    try:
        return canonical_uuid(value, field=field, description=description)
    except ValidationError as exc:
        problems.extend(exc.violations)
        return None


def _details(event: EventInput, where: str, problems: list[FieldViolation]) -> str | None:
    if event.details_error is not None:
        problems.append(FieldViolation(f"{where}.details", event.details_error))
        return None
    try:
        redacted = redact_details(event.details or {})
        text = canonical_json(json.dumps(redacted, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        problems.append(
            FieldViolation(f"{where}.details", "must be a JSON object with finite numbers")
        )
        return None
    if "\\u0000" in text:
        problems.append(FieldViolation(f"{where}.details", "must not contain NUL characters"))
        return None
    if len(text) > MAX_DETAILS_CHARS:
        problems.append(
            FieldViolation(
                f"{where}.details",
                f"must be at most {MAX_DETAILS_CHARS} characters as canonical JSON",
            )
        )
        return None
    return text


def _prepare(event: EventInput, where: str, problems: list[FieldViolation]) -> NewEvent | None:
    before = len(problems)
    event_id = checked_uuid(event.event_id, f"{where}.event_id", "must be a UUID", problems)
    subject_kind = event.subject_kind or TASK_SUBJECT
    _check_subject(event, subject_kind, where, problems)
    if event.event_type not in EVENT_TYPES:
        problems.append(
            FieldViolation(
                f"{where}.event_type", f"must be one of: {', '.join(sorted(EVENT_TYPES))}"
            )
        )
    elif subject_kind in SUBJECT_KINDS and EVENT_SUBJECTS[event.event_type] != subject_kind:
        problems.append(
            FieldViolation(
                f"{where}.subject_kind",
                f"must be {EVENT_SUBJECTS[event.event_type]!r} for {event.event_type}",
            )
        )
    user_id = checked_uuid(
        event.user_id, f"{where}.user_id", "must be the actor's user id (UUID)", problems
    )
    occur_us: int | None = None
    if event.occur_time is None:
        problems.append(FieldViolation(f"{where}.occur_time", "is required"))
    else:
        occur_us = micros_of(*event.occur_time)
        if occur_us is None:
            problems.append(
                FieldViolation(f"{where}.occur_time", "must be a valid timestamp (years 1-9999)")
            )
    if len(event.request_id) > MAX_REQUEST_ID_CHARS or not _PRINTABLE_ASCII.match(event.request_id):
        problems.append(
            FieldViolation(
                f"{where}.request_id",
                f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters",
            )
        )
    trace_id = ""
    if event.traceparent:
        parsed = trace_id_of(event.traceparent)
        if parsed is None:
            problems.append(
                FieldViolation(f"{where}.traceparent", "must be a W3C traceparent, or empty")
            )
        else:
            trace_id = parsed
    details = _details(event, where, problems)
    if (
        len(problems) > before
        or details is None
        or occur_us is None
        or event_id is None
        or user_id is None
    ):
        return None
    return NewEvent(
        event_id=event_id,
        task_id=event.task_id,
        event_type=event.event_type,
        user_id=user_id,
        details=details,
        occur_us=occur_us,
        request_id=event.request_id,
        trace_id=trace_id,
        subject_kind=subject_kind,
        subject_id=event.subject_id,
    )


def _check_subject(
    event: EventInput, subject_kind: str, where: str, problems: list[FieldViolation]
) -> None:
    """A task event names its task by task_id; any other names its subject by subject_id."""
    if subject_kind not in SUBJECT_KINDS:
        problems.append(
            FieldViolation(
                f"{where}.subject_kind",
                f"must be one of: {', '.join(sorted(SUBJECT_KINDS))}; or empty for a task",
            )
        )
    elif subject_kind == TASK_SUBJECT:
        if not 1 <= event.task_id <= _MAX_TASK_ID:
            problems.append(FieldViolation(f"{where}.task_id", "must be a positive task id"))
        if event.subject_id:
            problems.append(
                FieldViolation(f"{where}.subject_id", "must be empty for a task (task_id names it)")
            )
    else:
        if event.task_id != 0:
            problems.append(
                FieldViolation(f"{where}.task_id", f"must be 0 for a {subject_kind} event")
            )
        if (
            not event.subject_id
            or len(event.subject_id) > MAX_SUBJECT_ID_CHARS
            or not _PRINTABLE_ASCII.match(event.subject_id)
        ):
            problems.append(
                FieldViolation(
                    f"{where}.subject_id",
                    f"must name the {subject_kind} in 1 to {MAX_SUBJECT_ID_CHARS} printable "
                    "ASCII characters",
                )
            )


def prepare_batch(events: Sequence[EventInput]) -> list[NewEvent]:
    """Validate, redact and canonicalise a batch, keeping its order.

    An event id repeated inside the batch keeps its first occurrence; later ones count as
    duplicates, exactly as a redelivery in a later batch would.

    Raises:
        ValidationError: Any event is malformed (MHV-003); every violation is listed, each
            naming the event's index.

    """
    if not events:
        raise ValidationError(violations=[FieldViolation("events", "must not be empty")])
    if len(events) > MAX_BATCH_EVENTS:
        raise ValidationError(
            violations=[
                FieldViolation("events", f"must hold at most {MAX_BATCH_EVENTS} events per call")
            ]
        )
    problems: list[FieldViolation] = []
    prepared: list[NewEvent] = []
    for index, event in enumerate(events):
        ready = _prepare(event, f"events[{index}]", problems)
        if ready is not None:
            prepared.append(ready)
    if problems:
        raise ValidationError(
            "The batch holds malformed events; none was recorded.", violations=problems
        )
    return prepared
