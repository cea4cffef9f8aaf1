"""The store: every SQL statement of the gateway's inbox, dedup records and saga log."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from mhv_common.context import time_left
from mhv_common.db import Database

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
        (id, source, delivery_id, event, action, headers, body, traceparent, tracestate)
    SELECT $4, $1, $5, $6, $7, $8::jsonb, $9, $10, $11
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
    """SQL over the ``webhook`` schema."""

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
        traceparent: str | None,
        tracestate: str | None,
        timeout: float | None = None,
    ) -> AcceptResult:
        """Claim the dedup keys and enqueue the delivery, atomically, in one statement."""
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
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 - fixed fragments only
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
                f"SELECT {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 - fixed fragment
                " LEFT JOIN saga_log s ON s.delivery_id = d.id WHERE d.id = $1",
                delivery,
                timeout=timeout,
            )
        return DeliveryRow(**dict(row)) if row is not None else None

    async def requeue_dead_letter(
        self, delivery: uuid.UUID, *, timeout: float | None = None
    ) -> bool:
        """Put a dead-lettered delivery back to pending; False if it is not dead-lettered.

        The same row is re-queued, so the delivery keeps its dedup key and its saga log
        (a failed saga resumes from its last completed step with the same idempotency key).
        """
        async with self._db.transaction(timeout=timeout) as conn:
            updated = await conn.fetchval(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(),"
                " updated_at = now() WHERE id = $1 AND state = 'dead_letter' RETURNING id",
                delivery,
                timeout=timeout,
            )
            if updated is None:
                return False
            await conn.execute(
                "UPDATE saga_log SET state = 'running', updated_at = now()"
                " WHERE delivery_id = $1 AND state = 'failed'",
                delivery,
                timeout=timeout,
            )
        return True

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
            size = await conn.fetchval(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'webhook' AND c.relkind IN ('r', 'p', 'm')",
                timeout=timeout,
            )
        depth = dict.fromkeys(OPEN_STATES, 0)
        depth.update({r["state"]: int(r["n"]) for r in rows})
        return InboxStats(depth, float(lag), int(size))


# --- saga processing -------------------------------------------------------------------------

_CLAIM_SQL = """
WITH next AS (
    SELECT id FROM deliveries
    WHERE state IN ('pending', 'processing') AND next_attempt_at <= now()
      AND (leased_until IS NULL OR leased_until < now())
    ORDER BY next_attempt_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d
SET state = 'processing', leased_by = $1, leased_until = now() + make_interval(secs => $2),
    attempts = d.attempts + 1, updated_at = now()
FROM next
WHERE d.id = next.id
RETURNING d.id, d.source, d.event, d.action, d.body, d.traceparent, d.tracestate, d.attempts,
          extract(epoch FROM now() - d.received_at)::float8 AS age_seconds
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a worker leased, with what its saga has done so far."""

    id: uuid.UUID
    source: str
    event: str
    action: str
    body: bytes
    traceparent: str | None
    tracestate: str | None
    attempts: int
    age_seconds: float
    step: str
    saga_state: str
    task_id: int | None
    user_id: uuid.UUID | None
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class SagaRow:
    """The saga log row, read under its lock."""

    step: str
    state: str
    task_id: int | None
    user_id: uuid.UUID | None
    idempotency_key: str
    created_task: bool


class IssueBusy(Exception):
    """Another delivery's saga is creating this issue's task; try again a little later."""


class LeaseLost(Exception):
    """Another worker holds the delivery now (ours expired); stop working on it."""


class SagaStep:
    """One saga step, inside a transaction that holds the saga log row (FOR UPDATE)."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        delivery: uuid.UUID,
        worker: str,
        lease: float,
        saga: SagaRow,
    ) -> None:
        self._conn = conn
        self._delivery = delivery
        self._worker = worker
        self._lease = lease
        self.saga = saga

    async def record(
        self,
        step: str,
        *,
        task_id: int | None = None,
        user_id: uuid.UUID | None = None,
        created_task: bool | None = None,
    ) -> None:
        """Record the step as done (committed with the transaction) and renew the lease."""
        await self._conn.execute(
            "UPDATE saga_log SET step = $2, task_id = coalesce($3, task_id),"
            " user_id = coalesce($4, user_id), created_task = coalesce($5, created_task),"
            " updated_at = now() WHERE delivery_id = $1",
            self._delivery,
            step,
            task_id,
            user_id,
            created_task,
            timeout=time_left(),
        )
        await self._conn.execute(
            "UPDATE deliveries SET leased_until = now() + make_interval(secs => $2),"
            " updated_at = now() WHERE id = $1",
            self._delivery,
            self._lease,
            timeout=time_left(),
        )

    async def claim_issue(
        self, source: str, external_key: str, *, replace: bool
    ) -> tuple[int | None, bool]:
        """Find the issue's task, or claim the right to create it.

        Returns:
            (task id, False) when the issue already has a task to use; (None, True) when this
            saga now owns the issue's claim and must create the task.

        Raises:
            IssueBusy: Another delivery's claim is still being worked on.
        """
        await self._conn.execute(
            "INSERT INTO issue_links (source, external_key, task_id, delivery)"
            " VALUES ($1, $2, NULL, $3) ON CONFLICT (source, external_key) DO NOTHING",
            source,
            external_key,
            self._delivery,
            timeout=time_left(),
        )
        # The row lock serialises every saga touching this issue until we commit.
        row = await self._conn.fetchrow(
            "SELECT task_id, delivery FROM issue_links WHERE source = $1 AND external_key = $2"
            " FOR UPDATE",
            source,
            external_key,
            timeout=time_left(),
        )
        assert row is not None
        if row["task_id"] is None and row["delivery"] != self._delivery:
            raise IssueBusy(f"delivery {row['delivery']} is creating this issue's task")
        if row["task_id"] is not None and not replace:
            return int(row["task_id"]), False
        # Ours to create (a new issue, our own unfinished claim, a reopened issue, or an issue
        # whose task was deleted).
        await self._conn.execute(
            "UPDATE issue_links SET task_id = NULL, delivery = $3, updated_at = now()"
            " WHERE source = $1 AND external_key = $2",
            source,
            external_key,
            self._delivery,
            timeout=time_left(),
        )
        return None, True

    async def link_task(self, source: str, external_key: str, task_id: int) -> None:
        """Complete our claim: the issue's task is `task_id`."""
        await self._conn.execute(
            "UPDATE issue_links SET task_id = $3, updated_at = now()"
            " WHERE source = $1 AND external_key = $2 AND delivery = $4",
            source,
            external_key,
            task_id,
            self._delivery,
            timeout=time_left(),
        )


class Sagas:
    """SQL for saga workers: claim, step under lock, finish, reschedule, issue links."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim(self, *, worker: str, lease_seconds: float) -> Claimed | None:
        """Lease the next due delivery (SKIP LOCKED: never wait for another worker)."""
        async with self._db.transaction() as conn:
            row = await conn.fetchrow(_CLAIM_SQL, worker, float(lease_seconds), timeout=time_left())
            if row is None:
                return None
            saga = await conn.fetchrow(
                "INSERT INTO saga_log (delivery_id, idempotency_key) VALUES ($1, $2)"
                " ON CONFLICT (delivery_id) DO UPDATE SET updated_at = now()"
                " RETURNING step, state, task_id, user_id, idempotency_key, created_task",
                row["id"],
                f"webhook:{row['id']}",
            )
        return Claimed(
            id=row["id"],
            source=row["source"],
            event=row["event"],
            action=row["action"],
            body=bytes(row["body"]),
            traceparent=row["traceparent"],
            tracestate=row["tracestate"],
            attempts=row["attempts"],
            age_seconds=row["age_seconds"],
            step=saga["step"],
            saga_state=saga["state"],
            task_id=saga["task_id"],
            user_id=saga["user_id"],
            idempotency_key=saga["idempotency_key"],
        )

    @asynccontextmanager
    async def step(
        self, delivery: uuid.UUID, *, worker: str, lease_seconds: float
    ) -> AsyncIterator[SagaStep]:
        """One saga step, in a transaction holding the saga log row (SELECT ... FOR UPDATE).

        Raises:
            LeaseLost: Our lease expired and another worker may have the delivery.
        """
        async with self._db.transaction() as conn:
            # The saga row lock: no other worker advances this saga while we hold it.
            saga = await conn.fetchrow(
                "SELECT step, state, task_id, user_id, idempotency_key, created_task"
                " FROM saga_log WHERE delivery_id = $1 FOR UPDATE",
                delivery,
            )
            ours = await conn.fetchval(
                "SELECT leased_by = $2 AND leased_until > now() FROM deliveries WHERE id = $1",
                delivery,
                worker,
            )
            if saga is None or not ours:
                raise LeaseLost()
            yield SagaStep(conn, delivery, worker, lease_seconds, SagaRow(**dict(saga)))

    async def saga(self, delivery: uuid.UUID) -> SagaRow | None:
        """The saga log row of a delivery, as last committed."""
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "SELECT step, state, task_id, user_id, idempotency_key, created_task"
                " FROM saga_log WHERE delivery_id = $1",
                delivery,
                timeout=time_left(),
            )
        return SagaRow(**dict(row)) if row is not None else None

    async def release_claim(self, delivery: uuid.UUID, source: str, external_key: str) -> None:
        """Drop an issue link this delivery owns (its saga is being compensated)."""
        async with self._db.connection() as conn:
            await conn.execute(
                "DELETE FROM issue_links WHERE source = $1 AND external_key = $2 AND delivery = $3",
                source,
                external_key,
                delivery,
                timeout=time_left(),
            )

    async def purge_finished(self, *, retention_seconds: float, batch: int = 1000) -> int:
        """Delete finished deliveries (and their saga logs) older than the retention."""
        total = 0
        while True:
            async with self._db.connection() as conn:
                status = await conn.execute(
                    "DELETE FROM deliveries WHERE id = ANY (ARRAY("
                    " SELECT id FROM deliveries"
                    " WHERE state IN ('completed', 'ignored', 'compensated')"
                    " AND updated_at < now() - make_interval(secs => $1) LIMIT $2))",
                    float(retention_seconds),
                    batch,
                    timeout=time_left(),
                )
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    async def finish(
        self, delivery: uuid.UUID, *, worker: str, state: str, saga_state: str, error: str = ""
    ) -> bool:
        """End the delivery in `state`; False when our lease was lost meanwhile."""
        async with self._db.transaction() as conn:
            done = await conn.fetchval(
                "UPDATE deliveries SET state = $3, last_error = $4, leased_by = NULL,"
                " leased_until = NULL, updated_at = now()"
                " WHERE id = $1 AND leased_by = $2 RETURNING id",
                delivery,
                worker,
                state,
                error[:500],
            )
            if done is None:
                return False
            await conn.execute(
                "UPDATE saga_log SET state = $2, updated_at = now() WHERE delivery_id = $1",
                delivery,
                saga_state,
            )
        return True

    async def reschedule(
        self, delivery: uuid.UUID, *, worker: str, delay_seconds: float, dead: bool, error: str
    ) -> None:
        """Give the delivery back for a later attempt, or dead-letter it."""
        async with self._db.transaction() as conn:
            done = await conn.fetchval(
                "UPDATE deliveries SET state = $3, last_error = $4, leased_by = NULL,"
                " leased_until = NULL, next_attempt_at = now() + make_interval(secs => $5),"
                " updated_at = now() WHERE id = $1 AND leased_by = $2 RETURNING id",
                delivery,
                worker,
                "dead_letter" if dead else "pending",
                error[:500],
                float(delay_seconds),
            )
            if done is not None and dead:
                await conn.execute(
                    "UPDATE saga_log SET state = 'failed', updated_at = now()"
                    " WHERE delivery_id = $1",
                    delivery,
                )
