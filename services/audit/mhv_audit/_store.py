"""The audit store: the only module that speaks SQL.

Appends are serialised on the single row of ``chain_head``, locked ``FOR UPDATE`` from reading
the head to commit, so two batches can never be chained onto the same predecessor (the primary
key on the gap-free id would refuse the second anyway). Inside the lock an append costs two
statements: one that takes the lock and, in the same snapshot, finds which event ids are
already stored, and one that inserts the batch (one multi-row INSERT) and moves the head.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from mhv_audit._chain import ChainedEvent
from mhv_common import db
from mhv_common.db import Database
from mhv_common.errors import AuditChainBrokenError
from mhv_common.timestamps import from_micros, to_micros

# The columns every reader gets, in `mhv_audit._chain.StoredRow` order. Times come as integer
# microseconds since the epoch (exact: EXTRACT returns numeric), which is what the hash covers
# and far cheaper to decode than datetimes.
ROW_COLUMNS = (
    "id, event_id::text, task_id, event_type, user_id::text, details_canonical,"
    " (extract(epoch FROM occur_time) * 1000000)::bigint,"
    " (extract(epoch FROM created_at) * 1000000)::bigint,"
    " request_id, trace_id, prev_hash, hash, subject_kind, subject_id"
)
# Verification rows add whether the queryable jsonb still equals the hashed text. While
# ``details`` is still the generated column the migration made, it equals the text on every row
# by construction and the (costly) per-row comparison is skipped.
CHAIN_COLUMNS = f"{ROW_COLUMNS}, details = details_canonical::jsonb"
_CHAIN_COLUMNS_GENERATED = f"{ROW_COLUMNS}, true"
_DETAILS_GENERATED = """
SELECT coalesce(bool_and(a.attgenerated = 's'
                         AND pg_get_expr(d.adbin, d.adrelid) = '(details_canonical)::jsonb'), false)
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = 'task_audit_log'::regclass AND a.attname = 'details' AND NOT a.attisdropped
"""

_LOCK_HEAD = """
SELECT h.last_id, h.last_hash,
       (SELECT s.last_id FROM chain_head s) AS snapshot_last_id,
       ARRAY(SELECT l.event_id::text FROM task_audit_log l WHERE l.event_id = ANY($1::uuid[]))
           AS existing,
       clock_timestamp() AS now
FROM chain_head h
FOR UPDATE OF h
"""
_EXISTING_AFTER_WAIT = """
SELECT ARRAY(SELECT event_id::text FROM task_audit_log WHERE event_id = ANY($1::uuid[])),
       clock_timestamp()
"""
_APPEND = """
WITH appended AS (
    INSERT INTO task_audit_log (id, event_id, task_id, event_type, user_id, details_canonical,
                                occur_time, created_at, request_id, trace_id, prev_hash, hash,
                                subject_kind, subject_id)
    SELECT r.id, r.event_id, r.task_id, r.event_type, r.user_id, r.details,
           r.occur_time, $8, r.request_id, r.trace_id, r.prev_hash, r.hash,
           r.subject_kind, r.subject_id
    FROM unnest($1::bigint[], $2::uuid[], $3::bigint[], $4::text[], $5::uuid[], $6::text[],
                $7::timestamptz[], $9::text[], $10::text[], $11::bytea[], $12::bytea[],
                $15::text[], $16::text[])
         AS r(id, event_id, task_id, event_type, user_id, details, occur_time, request_id,
              trace_id, prev_hash, hash, subject_kind, subject_id)
    ORDER BY r.id
)
UPDATE chain_head SET last_id = $13, last_hash = $14, updated_at = $8
"""


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The head of the chain: the last appended row's id and hash (0 and zeros when empty)."""

    last_id: int
    last_hash: bytes


BuildRows = Callable[[ChainHead, frozenset[str], int], Sequence[ChainedEvent]]


@dataclass(frozen=True, slots=True)
class ListFilter:
    """What ListAuditEvents selects; every field None means "no condition"."""

    task_id: int | None
    user_id: str | None
    event_type: str | None
    start_us: int | None
    end_us: int | None
    newest_first: bool
    subject_kind: str | None = None
    subject_id: str | None = None


class AuditStore:
    """SQL for the audit log, over the service's pool."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(
        self,
        event_ids: Sequence[str],
        build: BuildRows,
        *,
        timeout: float | None = None,
    ) -> tuple[Sequence[ChainedEvent], frozenset[str]]:
        """Append a batch in one transaction holding the chain head lock.

        Args:
            event_ids: Ids of the batch's events, to find those already stored.
            build: Given the head, the ids already stored and the database clock (µs), returns
                the rows to append, chained after the head.
            timeout: Upper bound on the whole transaction (the request deadline also applies).

        Returns:
            The rows appended, and the event ids that were already stored.

        Raises:
            AuditChainBrokenError: The table disagrees with the chain head (a row already sits
                at the next id, or a trigger found a broken link): appending would extend a
                tampered chain (MHV-400).

        """
        try:
            async with self._db.transaction(timeout=timeout) as conn:
                locked = await conn.fetchrow(_LOCK_HEAD, list(event_ids))
                if locked is None:
                    raise AuditChainBrokenError("The audit chain head is missing.")
                existing: list[str] = locked["existing"]
                now: dt.datetime = locked["now"]
                if locked["snapshot_last_id"] != locked["last_id"]:
                    # Another batch committed while we waited for the lock; our snapshot
                    # predates it, so look again now that nobody else can append.
                    existing, now = await conn.fetchrow(_EXISTING_AFTER_WAIT, list(event_ids))
                head = ChainHead(locked["last_id"], bytes(locked["last_hash"]))
                known = frozenset(existing)
                rows = build(head, known, to_micros(now))
                if rows:
                    await conn.execute(
                        _APPEND,
                        *_columns(rows),
                        rows[-1].id,
                        rows[-1].hash,
                        [r.event.subject_kind for r in rows],
                        [r.event.subject_id for r in rows],
                    )
                return rows, known
        except (asyncpg.UniqueViolationError, asyncpg.DataCorruptedError) as exc:
            raise AuditChainBrokenError(
                "The audit log does not match its chain head; nothing was recorded.",
                recovery=(
                    "Operators: run VerifyAuditChain and follow "
                    "docs/runbooks/audit-chain-broken.md.",
                    "Events stay in the sender's outbox and are recorded once the chain is "
                    "repaired.",
                ),
            ) from exc

    async def list_events(
        self, where: ListFilter, *, after_id: int | None, limit: int, timeout: float | None = None
    ) -> list[asyncpg.Record]:
        """Rows matching `where`, in id order, after the cursor `after_id`, at most `limit`."""
        conditions: list[str] = []
        args: list[Any] = []

        def param(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if where.task_id is not None:
            conditions.append(f"task_id = {param(where.task_id)}")
        if where.user_id is not None:
            conditions.append(f"user_id = {param(where.user_id)}::uuid")
        if where.event_type is not None:
            conditions.append(f"event_type = {param(where.event_type)}")
        if where.subject_kind is not None:
            conditions.append(f"subject_kind = {param(where.subject_kind)}")
        if where.subject_id is not None:
            conditions.append(f"subject_id = {param(where.subject_id)}")
        if where.start_us is not None:
            conditions.append(f"created_at >= {param(from_micros(where.start_us))}")
        if where.end_us is not None:
            conditions.append(f"created_at < {param(from_micros(where.end_us))}")
        if after_id is not None:
            conditions.append(f"id {'<' if where.newest_first else '>'} {param(after_id)}")
        order = "DESC" if where.newest_first else "ASC"
        # Only fixed fragments and numbered parameters go into the text; each combination of
        # filters is its own prepared statement with its own plan.
        sql = (
            f"SELECT {ROW_COLUMNS} FROM task_audit_log"  # nosec B608: column lists and bounds are this module's constants; values are bound
            f" WHERE {' AND '.join(conditions) or 'true'}"
            f" ORDER BY id {order} LIMIT {param(limit)}"
        )
        async with self._db.connection(timeout=timeout) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=timeout)
            return rows

    @asynccontextmanager
    async def chain_snapshot(self, *, timeout: float | None = None) -> AsyncIterator[ChainSnapshot]:
        """A read-only, repeatable-read view of the chain: head and rows agree with each other."""
        async with self._db.transaction(
            isolation="repeatable_read", readonly=True, timeout=timeout
        ) as conn:
            yield ChainSnapshot(conn)

    async def schema_size(self, schema: str, *, timeout: float | None = None) -> int:
        """Bytes on disk of every table of `schema`, with its indexes and TOAST."""
        async with self._db.connection(timeout=timeout) as conn:
            return await db.schema_size(conn, schema, timeout=timeout)


class ChainSnapshot:
    """Reads of one consistent snapshot, for chain verification."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def head(self, *, timeout: float | None = None) -> ChainHead:
        """The chain head as of the snapshot."""
        row = await self._conn.fetchrow(
            "SELECT last_id, last_hash FROM chain_head", timeout=timeout
        )
        if row is None:
            raise AuditChainBrokenError("The audit chain head is missing.")
        return ChainHead(row["last_id"], bytes(row["last_hash"]))

    async def details_generated(self, *, timeout: float | None = None) -> bool:
        """Whether ``details`` is still generated from ``details_canonical`` (the catalog)."""
        generated: bool = await self._conn.fetchval(_DETAILS_GENERATED, timeout=timeout)
        return generated

    async def rows(
        self,
        *,
        after_id: int,
        until_id: int | None,
        limit: int,
        compare_details: bool,
        timeout: float | None = None,
    ) -> list[asyncpg.Record]:
        """Up to `limit` rows with ``after_id < id <= until_id``, in id order (`CHAIN_COLUMNS`).

        Args:
            after_id: Exclusive lower bound.
            until_id: Inclusive upper bound, or None for none.
            limit: Most rows returned.
            compare_details: Compare each row's jsonb with its hashed text; without it every
                row reports a match (right while `details_generated`).
            timeout: Bound on the query.

        """
        columns = CHAIN_COLUMNS if compare_details else _CHAIN_COLUMNS_GENERATED
        bound = "" if until_id is None else " AND id <= $3"
        sql = f"SELECT {columns} FROM task_audit_log WHERE id > $1{bound} ORDER BY id LIMIT $2"  # nosec B608: column lists and bounds are this module's constants; values are bound
        args = (after_id, limit) if until_id is None else (after_id, limit, until_id)
        found: list[asyncpg.Record] = await self._conn.fetch(sql, *args, timeout=timeout)
        return found

    async def row(self, row_id: int, *, timeout: float | None = None) -> asyncpg.Record | None:
        """The row with id `row_id`, if present (`CHAIN_COLUMNS`)."""
        sql = f"SELECT {CHAIN_COLUMNS} FROM task_audit_log WHERE id = $1"  # nosec B608: column lists and bounds are this module's constants; values are bound
        found: asyncpg.Record | None = await self._conn.fetchrow(sql, row_id, timeout=timeout)
        return found

    async def ids_with_hash(self, digest: bytes, *, timeout: float | None = None) -> list[int]:
        """Ids of rows whose stored hash is `digest` (a full scan: only used on a break)."""
        rows = await self._conn.fetch(
            "SELECT id FROM task_audit_log WHERE hash = $1 ORDER BY id", digest, timeout=timeout
        )
        return [r["id"] for r in rows]

    async def ids_linking_to(self, digest: bytes, *, timeout: float | None = None) -> list[int]:
        """Ids of rows whose prev_hash is `digest` (a full scan: only used on a break)."""
        rows = await self._conn.fetch(
            "SELECT id FROM task_audit_log WHERE prev_hash = $1 ORDER BY id",
            digest,
            timeout=timeout,
        )
        return [r["id"] for r in rows]


def _columns(rows: Sequence[ChainedEvent]) -> tuple[Any, ...]:
    return (
        [r.id for r in rows],
        [r.event.event_id for r in rows],
        [r.event.task_id for r in rows],
        [r.event.event_type for r in rows],
        [r.event.user_id for r in rows],
        [r.event.details for r in rows],
        [from_micros(r.event.occur_us) for r in rows],
        from_micros(rows[0].created_us),
        [r.event.request_id for r in rows],
        [r.event.trace_id for r in rows],
        [r.prev_hash for r in rows],
        [r.hash for r in rows],
    )
