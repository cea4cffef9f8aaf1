"""The inbox store: the SQL of receiving (dedup records, deliveries) and of operators' views.

The saga's statements are in `mhv_webhook._store_saga`; both stores work on the ``webhook``
schema and hold nothing but SQL.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mhv_common.db import Database, schema_size
from mhv_common.outbox import (
    SubjectEvent,
    insert_subject_event,
    outbox_backlog,
    purge_delivered,
)

STATES = ("pending", "processing", "completed", "ignored", "compensated", "dead_letter")
OPEN_STATES = ("pending", "processing", "dead_letter")

# One statement, hence one transaction: the dedup keys are claimed with a single
# INSERT ... ON CONFLICT DO NOTHING RETURNING, and the delivery is enqueued by the same
# statement only if every key was new. Concurrent identical deliveries serialise on the dedup
# primary key; exactly one of them sees all its keys returned.
ACCEPT_SQL = """
WITH claimed AS (
    INSERT INTO dedup (source, key_kind, key)
    SELECT $1, k.kind, k.key FROM unnest($2::text[], $3::text[]) AS k (kind, key)
    ON CONFLICT DO NOTHING
    RETURNING key_kind
), enqueued AS (
    INSERT INTO deliveries
        (id, source, delivery_id, event, action, headers, body, content_type, traceparent,
         tracestate)
    SELECT $4, $1, $5, $6, $7, $8::jsonb, $9, $12, $10, $11
    WHERE (SELECT count(*) FROM claimed) = cardinality($2::text[])
    RETURNING id
)
SELECT (SELECT id FROM enqueued) AS id,
       coalesce((SELECT array_agg(key_kind) FROM claimed), '{}') AS claimed
"""

# Which of a delivery's dedup keys are known already (read-only; ACCEPT_SQL stays the
# authority when two copies race).
KNOWN_SQL = """
SELECT coalesce(array_agg(d.key_kind), '{}') AS known
FROM unnest($2::text[], $3::text[]) AS k (kind, key)
JOIN dedup d ON d.source = $1 AND d.key_kind = k.kind AND d.key = k.key
"""

# Bounded batches keep each purge transaction short; the index on received_at finds them.
PURGE_SQL = """
DELETE FROM dedup
WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM dedup
    WHERE received_at < now() - make_interval(secs => $1)
    LIMIT $2
))
"""

_DELIVERY_COLUMNS = """
    d.id, d.source, d.delivery_id, d.event, d.action, d.state, d.attempts, d.last_error,
    d.received_at, d.updated_at, d.next_attempt_at, s.step AS saga_step, s.task_id
"""


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """Outcome of one accept.

    Attributes:
        delivery_id: The new inbox row's id, or None when the delivery was a repeat.
        repeated_kinds: Dedup key kinds already known (``delivery_id``, ``body_sha256``).

    """

    delivery_id: uuid.UUID | None
    repeated_kinds: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """One inbox row as operators see it."""

    id: uuid.UUID
    source: str
    delivery_id: str
    event: str
    action: str
    state: str
    attempts: int
    last_error: str
    received_at: dt.datetime
    updated_at: dt.datetime
    next_attempt_at: dt.datetime
    saga_step: str | None
    task_id: int | None


@dataclass(frozen=True, slots=True)
class InboxStats:
    """Gauges of the inbox."""

    depth: Mapping[str, int]
    oldest_pending_age_seconds: float
    schema_size_bytes: int


class Inbox:
    """SQL of the inbox: accept and recognise deliveries, list them, purge and measure."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def accept(
        self,
        *,
        source: str,
        dedup_keys: Sequence[tuple[str, str]],
        delivery_id: str,
        event: str,
        action: str,
        headers: Mapping[str, str],
        body: bytes,
        content_type: str,
        traceparent: str | None,
        tracestate: str | None,
        timeout: float | None = None,
    ) -> AcceptResult:
        """Claim the dedup keys and enqueue the delivery, atomically, in one statement.

        `content_type` is the media type the body was sent as, kept so the saga decodes it.
        """
        new_id = uuid.uuid4()
        async with self._db.connection(timeout=timeout) as conn:
            row = await conn.fetchrow(
                ACCEPT_SQL,
                source,
                [kind for kind, _ in dedup_keys],
                [key for _, key in dedup_keys],
                new_id,
                delivery_id,
                event,
                action,
                json.dumps(dict(headers)),
                body,
                traceparent,
                tracestate,
                content_type,
                timeout=timeout,
            )
        assert row is not None
        claimed = set(row["claimed"])
        repeated = tuple(kind for kind, _ in dedup_keys if kind not in claimed)
        return AcceptResult(row["id"], repeated)

    async def known(
        self, *, source: str, dedup_keys: Sequence[tuple[str, str]], timeout: float | None = None
    ) -> tuple[str, ...]:
        """The kinds of `dedup_keys` already recorded: non-empty means a repeat."""
        async with self._db.connection(timeout=timeout) as conn:
            known = await conn.fetchval(
                KNOWN_SQL,
                source,
                [kind for kind, _ in dedup_keys],
                [key for _, key in dedup_keys],
                timeout=timeout,
            )
        return tuple(known)

    async def purge_dedup(
        self, *, retention_seconds: float, batch: int = 10_000, timeout: float | None = None
    ) -> int:
        """Delete dedup records older than the retention; return how many went."""
        total = 0
        while True:
            async with self._db.connection(timeout=timeout) as conn:
                status = await conn.execute(
                    PURGE_SQL, float(retention_seconds), batch, timeout=timeout
                )
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    async def list_deliveries(
        self,
        *,
        source: str | None,
        state: str | None,
        after: tuple[dt.datetime, uuid.UUID] | None,
        limit: int,
        timeout: float | None = None,
    ) -> list[DeliveryRow]:
        """Deliveries newest first, optionally filtered, strictly after the keyset `after`."""
        clauses = ["TRUE"]
        args: list[object] = []
        if source is not None:
            args.append(source)
            clauses.append(f"d.source = ${len(args)}")
        if state is not None:
            args.append(state)
            clauses.append(f"d.state = ${len(args)}")
        if after is not None:
            args.extend(after)
            clauses.append(f"(d.received_at, d.id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 - fixed fragments only  # nosec B608: fixed column list and clauses; values are bound
            " LEFT JOIN saga_log s ON s.delivery_id = d.id"
            f" WHERE {' AND '.join(clauses)}"
            f" ORDER BY d.received_at DESC, d.id DESC LIMIT ${len(args)}"
        )
        async with self._db.connection(timeout=timeout) as conn:
            rows = await conn.fetch(sql, *args, timeout=timeout)
        return [DeliveryRow(**dict(r)) for r in rows]

    async def get_delivery(
        self, delivery: uuid.UUID, *, timeout: float | None = None
    ) -> DeliveryRow | None:
        """One delivery with its saga progress, or None."""
        async with self._db.connection(timeout=timeout) as conn:
            row = await conn.fetchrow(
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 - fixed fragment  # nosec B608: fixed column list and clauses; values are bound
                " LEFT JOIN saga_log s ON s.delivery_id = d.id WHERE d.id = $1",
                delivery,
                timeout=timeout,
            )
        return DeliveryRow(**dict(row)) if row is not None else None

    async def requeue_dead_letter(
        self,
        delivery: uuid.UUID,
        *,
        audit: Callable[[Mapping[str, Any]], SubjectEvent],
        timeout: float | None = None,
    ) -> bool:
        """Put a dead-lettered delivery back to pending; False if it is not dead-lettered.

        The same row is re-queued, so the delivery keeps its dedup key and its saga log
        (a failed saga resumes from its last completed step with the same idempotency key).
        `audit` builds the change's audit event from what the delivery was (its source, sender
        id, event and attempts); the event goes to the outbox in the same transaction.
        """
        async with self._db.transaction(timeout=timeout) as conn:
            before = await conn.fetchrow(
                "WITH old AS (SELECT id, source, delivery_id, event, attempts"
                " FROM deliveries WHERE id = $1 AND state = 'dead_letter' FOR UPDATE)"
                " UPDATE deliveries d SET state = 'pending', attempts = 0,"
                " next_attempt_at = now(), updated_at = now() FROM old WHERE d.id = old.id"
                " RETURNING old.source, old.delivery_id, old.event, old.attempts",
                delivery,
                timeout=timeout,
            )
            if before is None:
                return False
            await insert_subject_event(conn, audit(dict(before)), timeout=timeout)
            await conn.execute(
                "UPDATE saga_log SET state = 'running', updated_at = now()"
                " WHERE delivery_id = $1 AND state = 'failed'",
                delivery,
                timeout=timeout,
            )
        return True

    async def outbox_backlog(self, *, timeout: float) -> tuple[int, float]:
        """(undelivered audit events, age in seconds of the oldest one)."""
        async with self._db.connection(timeout=timeout) as conn:
            return await outbox_backlog(conn, timeout=timeout)

    async def purge_delivered_events(self, *, older_than: dt.timedelta, timeout: float) -> int:
        """Delete outbox events delivered to the audit service more than `older_than` ago."""
        async with self._db.connection(timeout=timeout) as conn:
            return await purge_delivered(conn, older_than=older_than, timeout=timeout)

    async def stats(self, *, timeout: float | None = None) -> InboxStats:
        """Open-state counts, age of the oldest pending delivery, and the schema's size."""
        async with self._db.connection(timeout=timeout) as conn:
            rows = await conn.fetch(
                "SELECT state, count(*) AS n FROM deliveries"
                " WHERE state IN ('pending', 'processing', 'dead_letter') GROUP BY state",
                timeout=timeout,
            )
            lag = await conn.fetchval(
                "SELECT coalesce(extract(epoch FROM now() - min(received_at)), 0)"
                " FROM deliveries WHERE state = 'pending'",
                timeout=timeout,
            )
            size = await schema_size(conn, "webhook", timeout=timeout)
        depth = dict.fromkeys(OPEN_STATES, 0)
        depth.update({r["state"]: int(r["n"]) for r in rows})
        return InboxStats(depth, float(lag), int(size))
