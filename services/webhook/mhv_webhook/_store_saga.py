"""The saga store: the SQL of processing (leases, the saga log under its row lock, issue links).

Every method takes a keyword-only `timeout` (seconds, None for no bound), applied to the wait
for a connection and to each statement.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from mhv_common.db import Database

# A delivery still 'processing' when its lease ran out was abandoned by its worker (killed, or
# stalled past the lease). One that had its last allowed attempt so is parked instead of
# being tried once more ($3: the maximum, 0 for none): attempts never exceed the maximum, and a
# delivery that kills or stalls every worker taking it stops doing so.
_CLAIM_SQL = """
WITH next AS (
    SELECT id, (state = 'processing' AND $3::int > 0 AND attempts >= $3::int) AS spent
    FROM deliveries
    WHERE state IN ('pending', 'processing') AND next_attempt_at <= now()
      AND (leased_until IS NULL OR leased_until < now())
    ORDER BY next_attempt_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d
SET state = CASE WHEN next.spent THEN 'dead_letter' ELSE 'processing' END,
    leased_by = CASE WHEN next.spent THEN NULL ELSE $1 END,
    leased_until = CASE WHEN next.spent THEN NULL ELSE now() + make_interval(secs => $2) END,
    attempts = CASE WHEN next.spent THEN d.attempts ELSE d.attempts + 1 END,
    last_error = CASE WHEN next.spent THEN format(
        'attempt %s of %s ended without an outcome: the worker processing it stopped or'
        ' stalled past its lease', d.attempts, $3::int) ELSE d.last_error END,
    updated_at = now()
FROM next
WHERE d.id = next.id
RETURNING d.id, d.source, d.event, d.action, d.body, d.content_type, d.traceparent,
          d.tracestate, d.attempts, next.spent,
          extract(epoch FROM now() - d.received_at)::float8 AS age_seconds
"""


# How much of a failure's text a delivery keeps.
ERROR_LIMIT = 500


def storable(text: str) -> str:
    """`text` as PostgreSQL text can hold it, cut to `ERROR_LIMIT` characters.

    A reason may quote the payload: NUL and lone surrogates (which UTF-8 cannot encode) are
    written as escapes, so that recording why a delivery failed cannot fail too.
    """
    text = text[:ERROR_LIMIT].replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a worker leased, with what its saga has done so far."""

    id: uuid.UUID
    source: str
    event: str
    action: str
    body: bytes
    content_type: str
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
class Abandoned:
    """A delivery found abandoned at its last allowed attempt, and dead-lettered on claim."""

    id: uuid.UUID
    attempts: int


@dataclass(frozen=True, slots=True)
class SagaRow:
    """The saga log row, read under its lock."""

    step: str
    state: str
    task_id: int | None
    user_id: uuid.UUID | None
    idempotency_key: str
    created_task: bool


@dataclass(frozen=True, slots=True)
class IssueLink:
    """Which task stands for an issue, read under its row lock.

    Attributes:
        task_id: The issue's task, or None while a saga creates it.
        delivery: The delivery whose saga last claimed the issue.
        state_at: When the newest state change applied to the task happened, if known.
        reader: The delivery whose saga read the link.
    """

    task_id: int | None
    delivery: uuid.UUID
    state_at: dt.datetime | None
    reader: uuid.UUID

    @property
    def being_created(self) -> bool:
        """Whether another delivery's saga is creating this issue's task right now."""
        return self.task_id is None and self.delivery != self.reader


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
        timeout: float | None = None,
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
            timeout=timeout,
        )
        await self._conn.execute(
            "UPDATE deliveries SET leased_until = now() + make_interval(secs => $2),"
            " updated_at = now() WHERE id = $1",
            self._delivery,
            self._lease,
            timeout=timeout,
        )

    async def lock_link(
        self, source: str, external_key: str, *, timeout: float | None = None
    ) -> IssueLink:
        """The issue's link, locked until this step commits.

        An issue without a link gets one claimed by this delivery, with no task yet: rows that
        do not exist cannot be locked, and two sagas of a new issue must not both find none.
        A saga that then decides to create nothing raises, and the rollback removes it.
        """
        await self._conn.execute(
            "INSERT INTO issue_links (source, external_key, task_id, delivery)"
            " VALUES ($1, $2, NULL, $3) ON CONFLICT (source, external_key) DO NOTHING",
            source,
            external_key,
            self._delivery,
            timeout=timeout,
        )
        # The row lock serialises every saga touching this issue until we commit.
        row = await self._conn.fetchrow(
            "SELECT task_id, delivery, state_at FROM issue_links"
            " WHERE source = $1 AND external_key = $2 FOR UPDATE",
            source,
            external_key,
            timeout=timeout,
        )
        assert row is not None
        return IssueLink(row["task_id"], row["delivery"], row["state_at"], self._delivery)

    async def claim_issue(
        self, source: str, external_key: str, *, timeout: float | None = None
    ) -> None:
        """Own the issue's (locked) link: this saga creates its task, replacing any other."""
        await self._conn.execute(
            "UPDATE issue_links SET task_id = NULL, delivery = $3, updated_at = now()"
            " WHERE source = $1 AND external_key = $2",
            source,
            external_key,
            self._delivery,
            timeout=timeout,
        )

    async def move_link(
        self, source: str, old_key: str, new_key: str, *, timeout: float | None = None
    ) -> bool:
        """Rename the link of `old_key` to `new_key` (the issue moved), if only the old exists.

        Both rows are locked in key order, so the two deliveries that report one transfer
        (``transferred`` at the old place, ``opened`` at the new) never deadlock.

        Returns:
            Whether the link moved.
        """
        rows = await self._conn.fetch(
            "SELECT external_key, task_id FROM issue_links WHERE source = $1"
            " AND external_key = ANY($2::text[]) ORDER BY external_key FOR UPDATE",
            source,
            sorted({old_key, new_key}),
            timeout=timeout,
        )
        found = {r["external_key"]: r["task_id"] for r in rows}
        if found.get(old_key) is None or new_key in found:
            return False
        try:
            await self._conn.execute(
                "UPDATE issue_links SET external_key = $3, updated_at = now()"
                " WHERE source = $1 AND external_key = $2",
                source,
                old_key,
                new_key,
                timeout=timeout,
            )
        except asyncpg.UniqueViolationError:
            # Another saga linked the new key meanwhile: look again once it is done.
            raise IssueBusy(f"another delivery is linking {new_key}") from None
        return True

    async def mark_state(
        self,
        source: str,
        external_key: str,
        happened_at: dt.datetime,
        *,
        timeout: float | None = None,
    ) -> None:
        """Remember when the newest state change applied to the issue happened."""
        await self._conn.execute(
            "UPDATE issue_links SET state_at = greatest(state_at, $3), updated_at = now()"
            " WHERE source = $1 AND external_key = $2",
            source,
            external_key,
            happened_at,
            timeout=timeout,
        )

    async def link_task(
        self, source: str, external_key: str, task_id: int, *, timeout: float | None = None
    ) -> None:
        """Complete our claim: the issue's task is `task_id`."""
        await self._conn.execute(
            "UPDATE issue_links SET task_id = $3, updated_at = now()"
            " WHERE source = $1 AND external_key = $2 AND delivery = $4",
            source,
            external_key,
            task_id,
            self._delivery,
            timeout=timeout,
        )


class Sagas:
    """SQL for saga workers: claim, step under lock, finish, reschedule, issue links."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim(
        self,
        *,
        worker: str,
        lease_seconds: float,
        max_attempts: int = 0,
        timeout: float | None = None,
    ) -> Claimed | Abandoned | None:
        """Lease the next due delivery (SKIP LOCKED: never wait for another worker).

        Returns:
            The leased delivery; or `Abandoned`: the next was one whose worker stopped during
            its attempt number `max_attempts` (0: no maximum), now dead-lettered; or None.
        """
        async with self._db.transaction(timeout=timeout) as conn:
            row = await conn.fetchrow(
                _CLAIM_SQL, worker, float(lease_seconds), max_attempts, timeout=timeout
            )
            if row is None:
                return None
            if row["spent"]:
                await _dead_lettered(conn, row["id"], timeout=timeout)
                return Abandoned(row["id"], row["attempts"])
            saga = await conn.fetchrow(
                "INSERT INTO saga_log (delivery_id, idempotency_key) VALUES ($1, $2)"
                " ON CONFLICT (delivery_id) DO UPDATE SET updated_at = now()"
                " RETURNING step, state, task_id, user_id, idempotency_key, created_task",
                row["id"],
                f"webhook:{row['id']}",
                timeout=timeout,
            )
        return Claimed(
            id=row["id"],
            source=row["source"],
            event=row["event"],
            action=row["action"],
            body=bytes(row["body"]),
            content_type=row["content_type"],
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
        self,
        delivery: uuid.UUID,
        *,
        worker: str,
        lease_seconds: float,
        timeout: float | None = None,
    ) -> AsyncIterator[SagaStep]:
        """One saga step, in a transaction holding the saga log row (SELECT ... FOR UPDATE).

        `timeout` bounds the transaction's start and the lock; the step's own statements take
        theirs (`SagaStep`).

        Raises:
            LeaseLost: Our lease expired and another worker may have the delivery.
        """
        async with self._db.transaction(timeout=timeout) as conn:
            # The saga row lock: no other worker advances this saga while we hold it.
            saga = await conn.fetchrow(
                "SELECT step, state, task_id, user_id, idempotency_key, created_task"
                " FROM saga_log WHERE delivery_id = $1 FOR UPDATE",
                delivery,
                timeout=timeout,
            )
            ours = await conn.fetchval(
                "SELECT leased_by = $2 AND leased_until > now() FROM deliveries WHERE id = $1",
                delivery,
                worker,
                timeout=timeout,
            )
            if saga is None or not ours:
                raise LeaseLost()
            yield SagaStep(conn, delivery, worker, lease_seconds, SagaRow(**dict(saga)))

    async def saga(self, delivery: uuid.UUID, *, timeout: float | None = None) -> SagaRow | None:
        """The saga log row of a delivery, as last committed."""
        async with self._db.connection(timeout=timeout) as conn:
            row = await conn.fetchrow(
                "SELECT step, state, task_id, user_id, idempotency_key, created_task"
                " FROM saga_log WHERE delivery_id = $1",
                delivery,
                timeout=timeout,
            )
        return SagaRow(**dict(row)) if row is not None else None

    async def release_claim(
        self, delivery: uuid.UUID, source: str, external_key: str, *, timeout: float | None = None
    ) -> None:
        """Drop an issue link this delivery owns (its saga is being compensated)."""
        async with self._db.connection(timeout=timeout) as conn:
            await conn.execute(
                "DELETE FROM issue_links WHERE source = $1 AND external_key = $2 AND delivery = $3",
                source,
                external_key,
                delivery,
                timeout=timeout,
            )

    async def purge_finished(
        self, *, retention_seconds: float, batch: int = 1000, timeout: float | None = None
    ) -> int:
        """Delete finished deliveries (and their saga logs) older than the retention."""
        total = 0
        while True:
            async with self._db.connection(timeout=timeout) as conn:
                status = await conn.execute(
                    "DELETE FROM deliveries WHERE id = ANY (ARRAY("
                    " SELECT id FROM deliveries"
                    " WHERE state IN ('completed', 'ignored', 'compensated')"
                    " AND updated_at < now() - make_interval(secs => $1) LIMIT $2))",
                    float(retention_seconds),
                    batch,
                    timeout=timeout,
                )
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    async def finish(
        self,
        delivery: uuid.UUID,
        *,
        worker: str,
        state: str,
        saga_state: str,
        error: str = "",
        timeout: float | None = None,
    ) -> bool:
        """End the delivery in `state`; False when our lease was lost meanwhile."""
        async with self._db.transaction(timeout=timeout) as conn:
            done = await conn.fetchval(
                "UPDATE deliveries SET state = $3, last_error = $4, leased_by = NULL,"
                " leased_until = NULL, updated_at = now()"
                " WHERE id = $1 AND leased_by = $2 RETURNING id",
                delivery,
                worker,
                state,
                storable(error),
                timeout=timeout,
            )
            if done is None:
                return False
            await conn.execute(
                "UPDATE saga_log SET state = $2, updated_at = now() WHERE delivery_id = $1",
                delivery,
                saga_state,
                timeout=timeout,
            )
        return True

    async def reschedule(
        self,
        delivery: uuid.UUID,
        *,
        worker: str,
        delay_seconds: float,
        dead: bool,
        error: str,
        timeout: float | None = None,
    ) -> None:
        """Give the delivery back for a later attempt, or dead-letter it."""
        async with self._db.transaction(timeout=timeout) as conn:
            done = await conn.fetchval(
                "UPDATE deliveries SET state = $3, last_error = $4, leased_by = NULL,"
                " leased_until = NULL, next_attempt_at = now() + make_interval(secs => $5),"
                " updated_at = now() WHERE id = $1 AND leased_by = $2 RETURNING id",
                delivery,
                worker,
                "dead_letter" if dead else "pending",
                storable(error),
                float(delay_seconds),
                timeout=timeout,
            )
            if done is not None and dead:
                await _dead_lettered(conn, delivery, timeout=timeout)


async def _dead_lettered(
    conn: asyncpg.Connection, delivery: uuid.UUID, *, timeout: float | None
) -> None:
    """The saga of a delivery just dead-lettered: failed, and its issue claim released.

    A claim this saga holds on an issue whose task it has not created yet would make every
    later delivery about that issue wait for it. A retry by an operator claims the issue
    again (step back to "actor"; the task request id is the delivery's, so a task created
    before the failure is found again, not made twice).
    """
    await conn.execute(
        "DELETE FROM issue_links WHERE delivery = $1 AND task_id IS NULL",
        delivery,
        timeout=timeout,
    )
    await conn.execute(
        "UPDATE saga_log SET state = 'failed', updated_at = now(),"
        " step = CASE WHEN step = 'claim' THEN 'actor' ELSE step END"
        " WHERE delivery_id = $1",
        delivery,
        timeout=timeout,
    )
