"""The transactional outbox to the audit service, shared by every service that writes one.

A service writes an audit event to its own schema's ``outbox`` table in the transaction of the
change it records (the task service for tasks and users, the webhook gateway for its admin
actions); `OutboxRelay` delivers the committed events to AuditService.RecordEvents, in order,
at least once.

Each round claims the oldest undelivered events with ``SELECT ... FOR UPDATE SKIP LOCKED``
(other replicas' claims are skipped, never waited for), sends them in one RecordEvents call with
a deadline, marks them delivered and commits. A crash anywhere before the commit releases the
claim and another relay sends the batch again; the audit service deduplicates by event id, so
every event is recorded exactly once. Events of one subject (a task, a user, a delivery) are
never sent out of order (`claim_pending_events`). While the audit service is down, events wait
in the outbox and the relay backs off exponentially; the service's own RPCs are unaffected.

Every outbox table has the same columns (the task and webhook migrations create them), so the
few statements here, like `mhv_common.db.schema_size`, are written once for all; they name the
table unqualified and run in the service's own schema (its role's ``search_path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from google.protobuf import struct_pb2
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_common import context
from mhv_common.auth import ServiceCredentials
from mhv_common.client import Peer, service_channel
from mhv_common.db import Database
from mhv_common.errors import AuthenticationError, DatabaseConnectionError
from mhv_common.ids import uuid_or_none
from mhv_common.redaction import redact_details
from mhv_common.timestamps import to_timestamp
from mhv_common.tracing import current_traceparent

logger = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 5.0
# While our own database is away, a round fails at once without reaching the audit service;
# retrying at the pace of readiness resumes delivery as soon as the database is back.
_MAX_BACKOFF_OWN_DATABASE_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An undelivered outbox row, as the relay claimed it (the table's column order)."""

    id: int
    event_id: uuid.UUID
    task_id: int
    event_type: str
    user_id: uuid.UUID
    details: dict[str, Any]
    request_id: str
    traceparent: str
    occurred_at: dt.datetime
    subject_kind: str = "task"
    subject_id: str = ""


@dataclass(frozen=True, slots=True)
class SubjectEvent:
    """An audit event about something other than a task, to write with its change.

    Attributes:
        event_type: What happened (one of the audit service's types for `subject_kind`).
        actor: The user it is attributed to.
        subject_kind: What it is about: ``user``, ``delivery``, ...
        subject_id: Which one.
        details: What changed, already redacted.
        request_id: The request that made the change ("" outside a request).
        traceparent: Its W3C trace context ("" when there is none).
    """

    event_type: str
    actor: uuid.UUID
    subject_kind: str
    subject_id: str
    details: dict[str, Any]
    request_id: str
    traceparent: str


def subject_event(
    event_type: str,
    *,
    actor: uuid.UUID,
    subject_kind: str,
    subject_id: str,
    details: Mapping[str, Any],
) -> SubjectEvent:
    """A `SubjectEvent` of the current request, its details redacted (`mhv_common.redaction`)."""
    ctx = context.current()
    return SubjectEvent(
        event_type,
        actor,
        subject_kind,
        subject_id,
        redact_details(details),
        ctx.request_id if ctx else "",
        current_traceparent(),
    )


def caller_user_id() -> uuid.UUID:
    """The user id of the current request's caller: the actor of an operator's change.

    Raises:
        AuthenticationError: No caller, or its token does not name a user (MHV-004).
    """
    ctx = context.current()
    user = uuid_or_none(ctx.principal.subject) if ctx and ctx.principal else None
    if user is None:
        raise AuthenticationError("The token's subject is not a user id.")
    return user


# --- the statements every outbox shares -----------------------------------------------------


async def insert_subject_event(
    conn: asyncpg.Connection, event: SubjectEvent, *, timeout: float | None
) -> None:
    """Write `event` to the outbox, in the caller's transaction (with its change)."""
    await conn.execute(
        "INSERT INTO outbox (task_id, event_type, user_id, details, request_id, traceparent,"
        " subject_kind, subject_id) VALUES (0, $1, $2, $3::jsonb, $4, $5, $6, $7)",
        event.event_type,
        event.actor,
        event.details,
        event.request_id,
        event.traceparent,
        event.subject_kind,
        event.subject_id,
        timeout=timeout,
    )


async def claim_pending_events(
    conn: asyncpg.Connection, *, limit: int, timeout: float | None
) -> list[PendingEvent]:
    """Lock the oldest undelivered events this relay may send now, keeping per-subject order.

    Rows other relays hold are skipped (SKIP LOCKED). An event is only claimed when no earlier
    undelivered event of the same subject (task, user, delivery) is held elsewhere, so two
    relays never send one subject's events out of order.
    """
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        WITH claimed AS (
            SELECT id, event_id, task_id, event_type, user_id, details, request_id,
                   traceparent, occurred_at, subject_kind, subject_id
            FROM outbox
            WHERE delivered_at IS NULL
            ORDER BY id
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        )
        SELECT c.* FROM claimed c
        WHERE NOT EXISTS (
            SELECT 1 FROM outbox o
            WHERE o.task_id = c.task_id AND o.subject_id = c.subject_id
              AND o.delivered_at IS NULL AND o.id < c.id
              AND o.id NOT IN (SELECT id FROM claimed)
        )
        ORDER BY c.id
        """,
        limit,
        timeout=timeout,
    )
    return [PendingEvent(*row.values()) for row in rows]


async def mark_delivered(
    conn: asyncpg.Connection, ids: Sequence[int], *, timeout: float | None
) -> None:
    """Mark events delivered."""
    await conn.execute(
        "UPDATE outbox SET delivered_at = now() WHERE id = ANY($1::bigint[])",
        list(ids),
        timeout=timeout,
    )


async def outbox_backlog(conn: asyncpg.Connection, *, timeout: float | None) -> tuple[int, float]:
    """(undelivered events, age in seconds of the oldest one)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS depth,
               coalesce(extract(epoch FROM now() - min(occurred_at)), 0) AS lag
        FROM outbox WHERE delivered_at IS NULL
        """,
        timeout=timeout,
    )
    return int(row["depth"]), float(row["lag"])


async def purge_delivered(
    conn: asyncpg.Connection, *, older_than: dt.timedelta, timeout: float | None
) -> int:
    """Delete delivered events older than `older_than`; returns how many."""
    status: str = await conn.execute(
        "DELETE FROM outbox WHERE delivered_at < now() - $1::interval", older_than, timeout=timeout
    )
    return int(status.split()[-1])


# --- the audit service, as the relay sends to it ----------------------------------------------


def to_record(event: PendingEvent) -> audit_pb2.EventRecord:
    """An outbox event as the audit service's EventRecord."""
    details = struct_pb2.Struct()
    details.update(event.details)
    return audit_pb2.EventRecord(
        event_id=str(event.event_id),
        task_id=event.task_id,
        event_type=event.event_type,
        user_id=str(event.user_id),
        details=details,
        occur_time=to_timestamp(event.occurred_at),
        request_id=event.request_id,
        traceparent=event.traceparent,
        subject_kind=event.subject_kind,
        subject_id=event.subject_id,
    )


class AuditSink(Protocol):
    """Where the relay sends events (`AuditClient`)."""

    async def record(self, events: Sequence[PendingEvent], *, timeout: float | None) -> None:
        """Record `events`, idempotently by event id, within `timeout`."""

    async def reachable(self, *, timeout: float) -> bool:
        """Whether the audit service can be reached (connected) within `timeout`."""


class AuditClient:
    """AuditService.RecordEvents over one channel, as the service that owns the outbox."""

    def __init__(self, channel: aio.Channel, credentials: ServiceCredentials) -> None:
        self._channel = channel
        self._stub = audit_pb2_grpc.AuditServiceStub(channel)
        self._credentials = credentials

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, peer: Peer, credentials: ServiceCredentials
    ) -> AsyncIterator[AuditClient]:
        """A client on a channel to `peer`, closed on exit."""
        async with service_channel(peer) as channel:
            yield cls(channel, credentials)

    async def record(self, events: Sequence[PendingEvent], *, timeout: float | None) -> None:
        """Record `events` (the audit service ignores those it has already).

        Waits for the audit service to be reachable, within `timeout`.
        """
        await self._stub.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[to_record(e) for e in events]),
            timeout=timeout,
            metadata=self._credentials.metadata(),
            wait_for_ready=True,
        )

    async def reachable(self, *, timeout: float) -> bool:
        """Whether the channel to the audit service connects within `timeout`."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True


def _ignore(*_: int) -> None:
    return None


class OutboxRelay:
    """Background worker relaying outbox rows to AuditService.RecordEvents.

    Args:
        db: The owning service's pool.
        connect: Opens the connection to the audit service for the relay's lifetime.
        batch_size: Most events per round.
        poll_interval: Pause after a round that found fewer than `batch_size` events.
        rpc_timeout: Bound on one RecordEvents call.
        on_delivered: Told how many events each successful round delivered (metrics).
        on_failed: Told of each failed round (metrics).
        crash_after_send: Kill the process after a send, before marking (drills only).
    """

    name = "outbox-relay"

    def __init__(
        self,
        db: Database,
        *,
        connect: Callable[[], AbstractAsyncContextManager[AuditSink]],
        batch_size: int = 200,
        poll_interval: float = 0.05,
        rpc_timeout: float = 5.0,
        on_delivered: Callable[[int], None] = _ignore,
        on_failed: Callable[[], None] = _ignore,
        crash_after_send: bool = False,
    ) -> None:
        self._crash_after_send = crash_after_send
        self._db = db
        self._connect = connect
        self._batch = batch_size
        self._poll = poll_interval
        self._rpc_timeout = rpc_timeout
        self._on_delivered = on_delivered
        self._on_failed = on_failed
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the current round and return."""
        self._stop.set()

    async def run(self) -> None:
        """Relay until stopped."""
        backoff = 0.0
        audit_failed = False
        async with self._connect() as audit:
            while not self._stop.is_set():
                # After a failed send, wait for the audit service before claiming again: a
                # round that waits for it inside its transaction holds a pool connection and
                # the claimed rows' locks for the whole RPC timeout, round after round.
                if audit_failed and not await self._audit_reachable(audit):
                    continue
                try:
                    sent = await self.relay_once(audit)
                except Exception as exc:  # any failure is retried
                    self._on_failed()
                    own_database = isinstance(exc, DatabaseConnectionError)
                    audit_failed = not own_database
                    ceiling = _MAX_BACKOFF_SECONDS
                    if own_database:
                        ceiling = _MAX_BACKOFF_OWN_DATABASE_SECONDS
                    backoff = min(max(backoff * 2, 0.1), ceiling)
                    logger.warning(
                        "outbox relay round failed; retrying",
                        extra={"error": type(exc).__name__, "retry_in_s": round(backoff, 2)},
                    )
                    await self._pause(backoff * random.uniform(0.5, 1.0))  # noqa: S311
                    continue
                backoff = 0.0
                audit_failed = False
                if sent < self._batch:
                    await self._pause(self._poll)

    async def _audit_reachable(self, audit: AuditSink) -> bool:
        """Whether the audit service connects within the RPC timeout; False once stopping."""
        reachable = asyncio.ensure_future(audit.reachable(timeout=self._rpc_timeout))
        stopping = asyncio.ensure_future(self._stop.wait())
        done, pending = await asyncio.wait(
            {reachable, stopping}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return reachable in done and reachable.result()

    async def relay_once(self, audit: AuditSink) -> int:
        """Claim, send and mark one batch; returns how many events were delivered."""
        with context.deadline_scope(self._rpc_timeout * 2):
            async with self._db.transaction() as conn:
                claimed = await claim_pending_events(
                    conn, limit=self._batch, timeout=context.time_left()
                )
                if not claimed:
                    return 0
                await audit.record(claimed, timeout=context.time_left(cap=self._rpc_timeout))
                if self._crash_after_send:
                    # The worst moment to die: the events are recorded, not yet marked.
                    os.kill(os.getpid(), signal.SIGKILL)
                await mark_delivered(conn, [e.id for e in claimed], timeout=context.time_left())
        self._on_delivered(len(claimed))
        return len(claimed)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
