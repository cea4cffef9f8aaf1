"""The gRPC edge of AuditService: decode, call the domain, encode.

Authentication, role gates, deadlines, rate limits and error mapping are the common
interceptors' job (`mhv_common.interceptors`, policies in `mhv_audit.app`); this module only
translates between protobuf and the domain.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import orjson
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_audit._chain import TASK_SUBJECT, StoredRow
from mhv_audit._events import OPERATOR_SUBJECTS, SUBJECT_KINDS, WRITER_SUBJECTS, EventInput
from mhv_audit._log import AuditLog, ListRequest
from mhv_audit._verify import BreakKind
from mhv_common import context as mhv_context
from mhv_common.auth import Role
from mhv_common.errors import AuthorizationError, FieldViolation, ValidationError
from mhv_common.structs import NotFiniteError, plain_struct
from mhv_common.timestamps import set_micros

_BREAK_KINDS = {
    BreakKind.MODIFIED: audit_pb2.BREAK_KIND_MODIFIED,
    BreakKind.MISSING: audit_pb2.BREAK_KIND_MISSING,
    BreakKind.REORDERED: audit_pb2.BREAK_KIND_REORDERED,
    BreakKind.INSERTED: audit_pb2.BREAK_KIND_INSERTED,
}


def _event_input(record: audit_pb2.EventRecord) -> EventInput:
    details: dict[str, Any] | None = None
    details_error: str | None = None
    if record.HasField("details"):
        try:
            details = plain_struct(record.details)
        except NotFiniteError as refused:
            # Reported by the domain with the batch's other violations, under the event's index.
            details_error = str(refused)
    occur_time = None
    if record.HasField("occur_time"):
        occur_time = (record.occur_time.seconds, record.occur_time.nanos)
    return EventInput(
        event_id=record.event_id,
        task_id=record.task_id,
        event_type=record.event_type,
        user_id=record.user_id,
        details=details,
        details_error=details_error,
        occur_time=occur_time,
        request_id=record.request_id,
        traceparent=record.traceparent,
        subject_kind=record.subject_kind,
        subject_id=record.subject_id,
    )


def _audit_event(row: StoredRow) -> audit_pb2.AuditEvent:
    # Sub-messages are filled in place: passing them to the constructor would copy them.
    event = audit_pb2.AuditEvent(
        id=row.id,
        event_id=row.event_id,
        task_id=row.task_id,
        event_type=row.event_type,
        user_id=row.user_id,
        request_id=row.request_id,
        trace_id=row.trace_id,
        prev_hash=row.prev_hash.hex(),
        hash=row.hash.hex(),
        subject_kind=row.subject_kind,
        subject_id=row.subject_id,
    )
    set_micros(event.occur_time, row.occur_us)
    set_micros(event.create_time, row.created_us)
    # The hashed text, not the jsonb column: what callers see is what the chain vouches for.
    value = orjson.loads(row.details)
    if isinstance(value, dict):
        event.details.update(value)
    return event


def _bound(request: Any, name: str) -> tuple[int, int] | None:
    if not request.HasField(name):
        return None
    stamp = getattr(request, name)
    return (stamp.seconds, stamp.nanos)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """AuditService over the domain's `AuditLog`.

    Args:
        log: The domain.
        writers: Service principals allowed to record, each only events about the subjects it
            owns (`mhv_audit.WRITER_SUBJECTS`). An administrator records only credential events
            attributed to themselves (`mhv keys`, `mhv secrets`).
    """

    def __init__(
        self, log: AuditLog, *, writers: Collection[str] = ("service:task", "service:webhook")
    ) -> None:
        self._log = log
        self._writers = frozenset(writers)

    def _writer(self) -> tuple[frozenset[str], str | None]:
        """The subject kinds the caller may record, and the actor it must name (people only)."""
        req = mhv_context.current()
        principal = req.principal if req is not None else None
        if principal is None:
            return frozenset(), None
        if principal.is_service:
            if principal.subject in self._writers:
                return WRITER_SUBJECTS.get(principal.subject, frozenset()), None
            return frozenset(), None
        if principal.has(Role.ADMIN):
            return OPERATOR_SUBJECTS, principal.subject
        return frozenset(), None

    async def RecordEvents(
        self, request: audit_pb2.RecordEventsRequest, context: aio.ServicerContext
    ) -> audit_pb2.RecordEventsResponse:
        """Append a batch of events (services' outbox relays; administrators' credential events)."""
        kinds, actor = self._writer()
        if not kinds:
            # The service role alone is not enough: another service (the internet-facing
            # gateway) must not be able to write task history.
            raise AuthorizationError("This caller may not record audit events.")
        inputs = [_event_input(e) for e in request.events]
        for event in inputs:
            # An unknown kind is the domain's to refuse, with the batch's other violations.
            kind = event.subject_kind or TASK_SUBJECT
            if kind in SUBJECT_KINDS and kind not in kinds:
                raise AuthorizationError(
                    f"This caller may record only events about: {', '.join(sorted(kinds))}."
                )
            if actor is not None and event.user_id.lower() != actor.lower():
                raise AuthorizationError("An administrator records only their own actions.")
        outcome = await self._log.record(inputs)
        return audit_pb2.RecordEventsResponse(
            recorded=outcome.recorded, duplicates=outcome.duplicates
        )

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: aio.ServicerContext
    ) -> audit_pb2.ListAuditEventsResponse:
        """List events, filtered and paged (admin and auditor)."""
        if request.order not in (
            audit_pb2.ORDER_UNSPECIFIED,
            audit_pb2.ORDER_NEWEST_FIRST,
            audit_pb2.ORDER_OLDEST_FIRST,
        ):
            raise ValidationError(
                violations=[
                    FieldViolation("order", "must be ORDER_NEWEST_FIRST or ORDER_OLDEST_FIRST")
                ]
            )
        page = await self._log.list_events(
            ListRequest(
                task_id=request.task_id,
                user_id=request.user_id,
                event_type=request.event_type,
                start_time=_bound(request, "start_time"),
                end_time=_bound(request, "end_time"),
                newest_first=request.order != audit_pb2.ORDER_OLDEST_FIRST,
                page_size=request.page_size,
                page_token=request.page_token,
                subject_kind=request.subject_kind,
                subject_id=request.subject_id,
            )
        )
        return audit_pb2.ListAuditEventsResponse(
            events=[_audit_event(row) for row in page.events],
            next_page_token=page.next_page_token,
        )

    async def VerifyAuditChain(
        self, request: audit_pb2.VerifyAuditChainRequest, context: aio.ServicerContext
    ) -> audit_pb2.VerifyAuditChainResponse:
        """Recompute the chain over a range (admin and auditor)."""
        result = await self._log.verify(start_id=request.start_id, end_id=request.end_id)
        response = audit_pb2.VerifyAuditChainResponse(
            ok=result.ok,
            rows_checked=result.rows_checked,
            head_id=result.head_id,
            head_hash=result.head_hash.hex(),
        )
        if result.first_break is not None:
            response.first_break.CopyFrom(
                audit_pb2.ChainBreak(
                    row_id=result.first_break.row_id,
                    kind=_BREAK_KINDS[result.first_break.kind],
                    detail=result.first_break.detail,
                )
            )
        return response
