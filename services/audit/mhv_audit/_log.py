"""The audit log's rules: record a batch once, list with stable pages, verify the chain."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate, trace

from mhv_audit._chain import (
    GENESIS_HASH,
    ChainedEvent,
    ChainScanner,
    NewEvent,
    StoredRow,
    link,
)
from mhv_audit._events import (
    EVENT_TYPES,
    MAX_SUBJECT_ID_CHARS,
    SUBJECT_KINDS,
    EventInput,
    checked_uuid,
    prepare_batch,
)
from mhv_audit._metrics import CHAIN_VERIFICATIONS, EVENTS_RECORDED, LAST_VERIFIED
from mhv_audit._store import AuditStore, ChainHead, ListFilter
from mhv_audit._verify import BreakKind, ChainBreak, diagnose
from mhv_common import paging
from mhv_common.errors import AuditChainBrokenError, FieldViolation, ValidationError
from mhv_common.timestamps import micros_of

_tracer = trace.get_tracer("mahavishnu.audit")

logger = logging.getLogger("mhv.audit")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Rows per read during verification: big enough to amortise the round trip, small enough that
# hashing one chunk does not hold the event loop for long (about 20-50 ms).
VERIFY_CHUNK_ROWS = 4000
_LOWEST_ID = -(2**63)


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """What RecordEvents did with a batch."""

    recorded: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class ListRequest:
    """ListAuditEvents as the edge decoded it, not yet validated.

    Attributes:
        task_id: 0 for any task.
        user_id: Empty for any user.
        event_type: Empty for any type.
        start_time: Inclusive lower bound on the stored time, (seconds, nanos), or None.
        end_time: Exclusive upper bound, or None.
        newest_first: Order of the listing.
        page_size: 0 for the default; values over the maximum are lowered to it.
        page_token: Empty for the first page.
        subject_kind: Empty for any kind of subject.
        subject_id: Empty for any subject.

    """

    task_id: int = 0
    user_id: str = ""
    event_type: str = ""
    start_time: tuple[int, int] | None = None
    end_time: tuple[int, int] | None = None
    newest_first: bool = True
    page_size: int = 0
    page_token: str = ""
    subject_kind: str = ""
    subject_id: str = ""


@dataclass(frozen=True, slots=True)
class EventPage:
    """One page of a listing."""

    events: list[StoredRow]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of VerifyAuditChain.

    Attributes:
        ok: No broken link in the range.
        rows_checked: Rows whose link and hash were verified before the first break.
        first_break: The first broken link, when not ok.
        head_id: Id of the last row verified (0 when none).
        head_hash: Stored hash of that row (zeros when none).

    """

    ok: bool
    rows_checked: int
    first_break: ChainBreak | None
    head_id: int
    head_hash: bytes


class AuditLog:
    """The audit service's domain: everything between the edge and the store."""

    def __init__(self, store: AuditStore) -> None:
        self._store = store
        # Appends are serialised by the chain head's row lock in the database; queueing them
        # here first keeps waiting calls from each holding a pooled connection. Replicas of
        # the service still take turns on the database lock.
        self._appending = asyncio.Lock()
        # Verification is CPU-bound: one at a time keeps appends and listings responsive.
        self._verifying = asyncio.Lock()

    # --- RecordEvents ------------------------------------------------------------------------

    async def record(self, events: Sequence[EventInput]) -> RecordOutcome:
        """Append a batch, idempotently by event id, in the order given.

        Raises:
            ValidationError: Any event is malformed; nothing is recorded (MHV-003).
            AuditChainBrokenError: The log disagrees with its chain head (MHV-400).

        """
        prepared = prepare_batch(events)
        unique: dict[str, NewEvent] = {}
        for event in prepared:
            unique.setdefault(event.event_id, event)

        def build(head: ChainHead, stored: frozenset[str], now_us: int) -> list[ChainedEvent]:
            fresh = [e for e in unique.values() if e.event_id not in stored]
            return link(fresh, head_id=head.last_id, head_hash=head.last_hash, created_us=now_us)

        async with self._appending:
            rows, _stored = await self._store.append(list(unique), build)
        outcome = RecordOutcome(recorded=len(rows), duplicates=len(prepared) - len(rows))
        _trace_recorded(rows, {e.event_id.lower(): e.traceparent for e in events})
        EVENTS_RECORDED.labels("recorded").inc(outcome.recorded)
        EVENTS_RECORDED.labels("duplicate").inc(outcome.duplicates)
        logger.info(
            "audit events recorded",
            extra={
                "recorded": outcome.recorded,
                "duplicates": outcome.duplicates,
                "first_row_id": rows[0].id if rows else None,
                "last_row_id": rows[-1].id if rows else None,
            },
        )
        return outcome

    # --- ListAuditEvents ---------------------------------------------------------------------

    async def list_events(self, request: ListRequest) -> EventPage:
        """One page of the events matching the request's filters.

        Raises:
            ValidationError: A filter is malformed (MHV-003).
            InvalidPageTokenError: The token is not ours or was issued for other filters
                (MHV-011).

        """
        where, page_size = _list_filter(request)
        # The token is a cursor, not an offset: the id of the page's last row, so the next page
        # is ``id < cursor`` (newest first) or ``id > cursor`` (oldest first). Rows appended
        # meanwhile never shift a page. It is valid only with the filters and order it was
        # issued for.
        filters = dataclasses.asdict(where)
        position = paging.decode_token(
            request.page_token, filters=filters, fields={"after_id": int}
        )
        after = position["after_id"] if position is not None else None
        found = await self._store.list_events(where, after_id=after, limit=page_size + 1)
        rows = [StoredRow.of(r) for r in found[:page_size]]
        token = ""
        if len(found) > page_size:
            token = paging.encode_token({"after_id": rows[-1].id}, filters=filters)
        return EventPage(rows, token)

    # --- VerifyAuditChain --------------------------------------------------------------------

    async def verify(self, *, start_id: int = 0, end_id: int = 0) -> Verification:
        """Recompute the chain over ``[start_id, end_id]`` and report the first broken link.

        0 for `start_id` means the beginning of the log (rows below id 1 included, which can
        only be forgeries); 0 for `end_id` means its end (rows past the head included). The
        first row of a range starting later is checked against the stored hash of the row
        before it, when that row exists.

        Raises:
            ValidationError: The range is malformed (MHV-003).

        """
        problems = []
        if start_id < 0:
            problems.append(FieldViolation("start_id", "must be a row id (1 or more), or 0"))
        if end_id < 0:
            problems.append(FieldViolation("end_id", "must be a row id (1 or more), or 0"))
        if start_id > 0 and end_id > 0 and end_id < start_id:
            problems.append(FieldViolation("end_id", "must not be below start_id"))
        if problems:
            raise ValidationError(violations=problems)
        async with self._verifying:
            result = await self._verify(start_id, end_id)
        CHAIN_VERIFICATIONS.labels("ok" if result.ok else "broken").inc()
        if result.ok and start_id <= 1 and end_id == 0:
            LAST_VERIFIED.set_to_current_time()
        if result.first_break is not None:
            brk = result.first_break
            logger.error(
                "audit chain broken",
                extra={
                    "error_code": AuditChainBrokenError.code,
                    "row_id": brk.row_id,
                    "kind": brk.kind.value,
                    "detail": brk.detail,
                    "rows_checked": result.rows_checked,
                },
            )
        else:
            logger.info(
                "audit chain verified",
                extra={"rows_checked": result.rows_checked, "head_id": result.head_id},
            )
        return result

    async def _verify(self, start_id: int, end_id: int) -> Verification:
        async with self._store.chain_snapshot() as snap:
            head = await snap.head()
            until = end_id or None
            head_in_view = until is None or until >= head.last_id
            expected_prev: bytes | None
            if start_id <= 1:
                expected_id, expected_prev, after = 1, GENESIS_HASH, _LOWEST_ID
            else:
                before = await snap.row(start_id - 1)
                expected_id, after = start_id, start_id - 1
                expected_prev = StoredRow.of(before).hash if before is not None else None
            # Only if someone detached the generated jsonb column can it differ from the hashed
            # text; then every row is compared, to name the first that differs.
            compare = not await snap.details_generated()
            scanner = ChainScanner(
                expected_id=expected_id,
                expected_prev=expected_prev,
                head_id=head.last_id if head_in_view else None,
            )

            def read_after(row_id: int) -> asyncio.Future[list[Any]]:
                return asyncio.ensure_future(
                    snap.rows(
                        after_id=row_id,
                        until_id=until,
                        limit=VERIFY_CHUNK_ROWS,
                        compare_details=compare,
                    )
                )

            pending = read_after(after)
            while True:
                chunk = await pending
                if not chunk:
                    break
                after = chunk[-1][0]
                # Ask for the next chunk before hashing this one, so the database reads it
                # meanwhile; only one query is ever in flight on the connection.
                pending = (
                    read_after(after)
                    if len(chunk) == VERIFY_CHUNK_ROWS
                    else asyncio.ensure_future(_no_rows())
                )
                await asyncio.sleep(0)
                bad = scanner.feed(chunk)
                if bad is not None:
                    await pending
                    last = StoredRow.of(scanner.last) if scanner.last is not None else None
                    found = await diagnose(
                        snap,
                        StoredRow.of(chunk[bad]),
                        last,
                        expected_id=scanner.expected_id,
                        expected_prev=scanner.expected_prev,
                        head=head,
                        head_in_view=head_in_view,
                    )
                    return self._outcome(scanner, found)
            return self._outcome(scanner, _tail_break(scanner, head, start_id, until))

    @staticmethod
    def _outcome(scanner: ChainScanner, found: ChainBreak | None) -> Verification:
        last = StoredRow.of(scanner.last) if scanner.last is not None else None
        return Verification(
            ok=found is None,
            rows_checked=scanner.rows_checked,
            first_break=found,
            head_id=last.id if last is not None else 0,
            head_hash=last.hash if last is not None else GENESIS_HASH,
        )


async def _no_rows() -> list[Any]:
    return []


def _tail_break(
    scanner: ChainScanner, head: ChainHead, start_id: int, until: int | None
) -> ChainBreak | None:
    """After a clean scan: whether the rows reach as far as the head says they should."""
    should_reach = head.last_id if until is None else min(until, head.last_id)
    last = StoredRow.of(scanner.last) if scanner.last is not None else None
    reached = last.id if last is not None else max(start_id, 1) - 1
    if reached < should_reach:
        return ChainBreak(
            reached + 1,
            BreakKind.MISSING,
            f"rows {reached + 1}..{should_reach} are absent: the chain head says the log "
            f"ends at row {head.last_id}",
        )
    if last is not None and last.id == head.last_id and last.hash != head.last_hash:
        return ChainBreak(
            last.id,
            BreakKind.MODIFIED,
            f"row {last.id} is not the row the chain head recorded: it was rewritten "
            "together with its hash",
        )
    return None


def _list_filter(request: ListRequest) -> tuple[ListFilter, int]:
    problems: list[FieldViolation] = []
    if request.task_id < 0:
        problems.append(FieldViolation("task_id", "must be a task id, or 0 for any task"))
    user_id = None
    if request.user_id:
        user_id = checked_uuid(
            request.user_id, "user_id", "must be a user id (UUID), or empty", problems
        )
    if request.event_type and request.event_type not in EVENT_TYPES:
        problems.append(
            FieldViolation(
                "event_type", f"must be one of: {', '.join(sorted(EVENT_TYPES))}; or empty"
            )
        )
    if request.subject_kind and request.subject_kind not in SUBJECT_KINDS:
        problems.append(
            FieldViolation(
                "subject_kind", f"must be one of: {', '.join(sorted(SUBJECT_KINDS))}; or empty"
            )
        )
    if len(request.subject_id) > MAX_SUBJECT_ID_CHARS:
        problems.append(
            FieldViolation("subject_id", f"must be at most {MAX_SUBJECT_ID_CHARS} characters")
        )
    start_us = end_us = None
    if request.start_time is not None:
        start_us = micros_of(*request.start_time)
        if start_us is None:
            problems.append(FieldViolation("start_time", "must be a valid timestamp"))
    if request.end_time is not None:
        end_us = micros_of(*request.end_time)
        if end_us is None:
            problems.append(FieldViolation("end_time", "must be a valid timestamp"))
    if start_us is not None and end_us is not None and end_us <= start_us:
        problems.append(FieldViolation("end_time", "must be after start_time"))
    if request.page_size < 0:
        problems.append(FieldViolation("page_size", "must not be negative"))
    if problems:
        raise ValidationError(violations=problems)
    where = ListFilter(
        task_id=request.task_id or None,
        user_id=user_id,
        event_type=request.event_type or None,
        start_us=start_us,
        end_us=end_us,
        newest_first=request.newest_first,
        subject_kind=request.subject_kind or None,
        subject_id=request.subject_id or None,
    )
    return where, paging.page_size(
        request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE
    )


def _trace_recorded(rows: Sequence[ChainedEvent], traceparents: Mapping[str, str]) -> None:
    """Add each stored event to the trace of the change it records.

    The relay's RecordEvents call is a trace of its own; a short span per event, parented by
    the event's traceparent, makes the audit record part of the trace that began at the caller
    (a webhook, a person's RPC).
    """
    for row in rows:
        traceparent = traceparents.get(row.event.event_id)
        if not traceparent:
            continue
        parent = propagate.extract({"traceparent": traceparent})
        _tracer.start_span(
            "audit.record_event",
            context=parent,
            attributes={
                "audit.row_id": row.id,
                "audit.event_type": row.event.event_type,
                "task.id": row.event.task_id,
                "audit.subject_kind": row.event.subject_kind,
            },
        ).end()
