"""SQL for users, tasks and the outbox. The only module of the task service that holds SQL.

Every statement takes its values as parameters; the few dynamic fragments (which filters are
present, which columns an update sets) come from fixed whitelists, never from input. Every call
is bounded by the remaining request deadline.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from mhv_common.context import time_left

TASK_COLUMNS = (
    "id, title, description, repository, priority::text AS priority, status::text AS status, "
    "status_before_block::text AS status_before_block, deadline, created_by, assigned_to, "
    "metadata, blocked_reason, cancel_reason, quality_gate, created_at, updated_at, "
    "started_at, completed_at, version, request_fingerprint"
)
USER_COLUMNS = (
    "id, username, email, display_name, created_at, updated_at, last_login_at, is_active, metadata"
)
# Columns UpdateTask and the transitions may set, and their SQL casts.
_SETTABLE: dict[str, str] = {
    "title": "",
    "description": "",
    "priority": "::task_priority",
    "deadline": "",
    "metadata": "::jsonb",
    "status": "::task_status",
    "status_before_block": "::task_status",
    "assigned_to": "::uuid",
    "blocked_reason": "",
    "cancel_reason": "",
    "quality_gate": "::jsonb",
    "started_at": "",
    "completed_at": "",
}


# An outbox row as claimed by the relay.
OutboxRow = asyncpg.Record


def _t() -> float | None:
    return time_left()


# --- tasks ------------------------------------------------------------------------------------

_INSERT_TASK = f"""
WITH creator AS (
    SELECT id FROM users WHERE id = $1 AND is_active
), assignee AS (
    SELECT $2::uuid IS NULL OR EXISTS (SELECT 1 FROM users WHERE id = $2 AND is_active) AS ok
), t AS (
    INSERT INTO tasks (created_by, assigned_to, title, description, repository, priority,
                       deadline, metadata, request_key, request_fingerprint)
    SELECT creator.id, $2, $3, $4, $5, $6::task_priority, $7, $8::jsonb, $9, $10
    FROM creator, assignee
    WHERE assignee.ok
    ON CONFLICT (request_key) DO NOTHING
    RETURNING *
), event AS (
    INSERT INTO outbox (task_id, event_type, user_id, details, request_id, traceparent)
    SELECT t.id, 'task_created', $1, $11::jsonb, $12, $13 FROM t
)
SELECT {TASK_COLUMNS} FROM t
"""


async def insert_task(
    conn: asyncpg.Connection,
    *,
    created_by: uuid.UUID,
    assigned_to: uuid.UUID | None,
    title: str,
    description: str | None,
    repository: str,
    priority: str,
    deadline: dt.datetime | None,
    metadata: Mapping[str, Any],
    request_key: str | None,
    request_fingerprint: str | None,
    event_details: Mapping[str, Any],
    request_id: str,
    traceparent: str,
) -> asyncpg.Record | None:
    """Insert a task and its task_created event in one statement.

    Returns None when nothing was inserted: the request key exists already, or the author or
    assignee is missing or inactive (the caller finds out which).
    """
    row: asyncpg.Record | None = await conn.fetchrow(
        _INSERT_TASK,
        created_by,
        assigned_to,
        title,
        description,
        repository,
        priority,
        deadline,
        dict(metadata),
        request_key,
        request_fingerprint,
        dict(event_details),
        request_id,
        traceparent,
        timeout=_t(),
    )
    return row


async def task_by_request_key(conn: asyncpg.Connection, key: str) -> asyncpg.Record | None:
    """The task created under an idempotency key."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE request_key = $1", key, timeout=_t()
    )
    return row


async def get_task(
    conn: asyncpg.Connection, task_id: int, *, for_update: bool = False
) -> asyncpg.Record | None:
    """One task, optionally locked until the end of the transaction."""
    lock = " FOR UPDATE" if for_update else ""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1{lock}", task_id, timeout=_t()
    )
    return row


async def update_task(
    conn: asyncpg.Connection,
    task_id: int,
    changes: Mapping[str, Any],
    *,
    event: tuple[str, uuid.UUID, Mapping[str, Any], str, str],
) -> asyncpg.Record:
    """Apply `changes`, bump the version and record the event, in one statement.

    Args:
        conn: A connection inside the caller's transaction (which holds the row lock).
        task_id: The task.
        changes: Column -> new value; columns must be in the settable whitelist.
        event: (event type, actor, details, request id, traceparent).
    """
    sets: list[str] = []
    args: list[Any] = [task_id]
    for column, value in changes.items():
        cast = _SETTABLE[column]  # KeyError for anything outside the whitelist
        args.append(value)
        sets.append(f"{column} = ${len(args)}{cast}")
    event_type, actor, details, request_id, traceparent = event
    args.extend([event_type, actor, dict(details), request_id, traceparent])
    n = len(args)
    sql = f"""
    WITH t AS (
        UPDATE tasks SET {", ".join([*sets, "version = version + 1", "updated_at = now()"])}
        WHERE id = $1
        RETURNING *
    ), event AS (
        INSERT INTO outbox (task_id, event_type, user_id, details, request_id, traceparent)
        SELECT t.id, ${n - 4}, ${n - 3}, ${n - 2}::jsonb, ${n - 1}, ${n} FROM t
    )
    SELECT {TASK_COLUMNS} FROM t
    """
    row: asyncpg.Record = await conn.fetchrow(sql, *args, timeout=_t())
    return row


async def delete_task(
    conn: asyncpg.Connection,
    task_id: int,
    *,
    event: tuple[uuid.UUID, Mapping[str, Any], str, str],
) -> bool:
    """Delete a task and record task_deleted, in one statement."""
    actor, details, request_id, traceparent = event
    deleted = await conn.fetchval(
        """
        WITH t AS (DELETE FROM tasks WHERE id = $1 RETURNING id), event AS (
            INSERT INTO outbox (task_id, event_type, user_id, details, request_id, traceparent)
            SELECT t.id, 'task_deleted', $2, $3::jsonb, $4, $5 FROM t
        )
        SELECT count(*) FROM t
        """,
        task_id,
        actor,
        dict(details),
        request_id,
        traceparent,
        timeout=_t(),
    )
    return bool(deleted)


_LIST_FILTERS: dict[str, str] = {
    "repository": "repository = ${}",
    "status": "status = ${}::task_status",
    "priority": "priority = ${}::task_priority",
    "assigned_to": "assigned_to = ${}::uuid",
}


async def list_tasks(
    conn: asyncpg.Connection,
    *,
    filters: Mapping[str, Any],
    before_id: int | None,
    limit: int,
) -> Sequence[asyncpg.Record]:
    """Tasks matching `filters`, newest first, with id below `before_id`."""
    where, args = [], []
    for name, fragment in _LIST_FILTERS.items():
        if filters.get(name) is not None:
            args.append(filters[name])
            where.append(fragment.format(len(args)))
    if before_id is not None:
        args.append(before_id)
        where.append(f"id < ${len(args)}")
    args.append(limit)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM tasks {clause} ORDER BY id DESC LIMIT ${len(args)}",
        *args,
        timeout=_t(),
    )
    return rows


async def search_tasks(
    conn: asyncpg.Connection,
    *,
    query: str,
    filters: Mapping[str, Any],
    after: tuple[float, int] | None,
    limit: int,
) -> Sequence[asyncpg.Record]:
    """Full-text matches for `query`, best first (rank, then newest)."""
    args: list[Any] = [query]
    where = ["search_vector @@ q"]
    for name in ("repository", "status"):
        if filters.get(name) is not None:
            args.append(filters[name])
            where.append(_LIST_FILTERS[name].format(len(args)))
    rank = "ts_rank_cd(search_vector, q)"
    if after is not None:
        args.extend(after)
        where.append(f"({rank}, id) < (${len(args) - 1}::real, ${len(args)})")
    args.append(limit)
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {TASK_COLUMNS}, {rank} AS rank
        FROM tasks, websearch_to_tsquery('english', $1) AS q
        WHERE {" AND ".join(where)}
        ORDER BY rank DESC, id DESC
        LIMIT ${len(args)}
        """,
        *args,
        timeout=_t(),
    )
    return rows


# --- users ------------------------------------------------------------------------------------


async def user_state(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, lock: bool = False
) -> bool | None:
    """True for an active user, False for a deactivated one, None for no such user.

    With `lock`, the answer holds until the transaction ends: the row is locked FOR SHARE, so
    a concurrent deactivation or deletion waits for it (and then sees what it committed).
    """
    value: bool | None = await conn.fetchval(
        "SELECT is_active FROM users WHERE id = $1" + (" FOR SHARE" if lock else ""),
        user_id,
        timeout=_t(),
    )
    return value


class Taken(Exception):
    """A unique username or email is taken; `field` says which."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class StillReferenced(Exception):
    """A row cannot go: others refer to it (a foreign key with ON DELETE RESTRICT)."""


async def insert_user(
    conn: asyncpg.Connection,
    *,
    username: str,
    email: str,
    display_name: str | None,
    metadata: Mapping[str, Any],
) -> asyncpg.Record:
    """Insert a user.

    Raises:
        Taken: The username or the email belongs to another user.
    """
    try:
        return await _insert_user(
            conn, username=username, email=email, display_name=display_name, metadata=metadata
        )
    except asyncpg.UniqueViolationError as exc:
        raise Taken("email" if "email" in (exc.constraint_name or "") else "username") from None


async def _insert_user(
    conn: asyncpg.Connection,
    *,
    username: str,
    email: str,
    display_name: str | None,
    metadata: Mapping[str, Any],
) -> asyncpg.Record:
    row: asyncpg.Record = await conn.fetchrow(
        f"INSERT INTO users (username, email, display_name, metadata) VALUES ($1, $2, $3, $4)"
        f" RETURNING {USER_COLUMNS}",
        username,
        email,
        display_name,
        dict(metadata),
        timeout=_t(),
    )
    return row


async def get_user(
    conn: asyncpg.Connection,
    *,
    user_id: uuid.UUID | None = None,
    username: str | None = None,
    for_update: bool = False,
) -> asyncpg.Record | None:
    """One user by id or by username, optionally locked until the end of the transaction."""
    if user_id is not None:
        lock = " FOR UPDATE" if for_update else ""
        row: asyncpg.Record | None = await conn.fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE id = $1{lock}", user_id, timeout=_t()
        )
    else:
        row = await conn.fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE username = $1", username, timeout=_t()
        )
    return row


async def list_users(
    conn: asyncpg.Connection, *, after_username: str | None, include_inactive: bool, limit: int
) -> Sequence[asyncpg.Record]:
    """Users by username."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {USER_COLUMNS} FROM users
        WHERE ($1::text IS NULL OR username > $1) AND ($2 OR is_active)
        ORDER BY username LIMIT $3
        """,
        after_username,
        include_inactive,
        limit,
        timeout=_t(),
    )
    return rows


async def deactivate_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> asyncpg.Record | None:
    """Mark a user inactive."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"UPDATE users SET is_active = false, updated_at = now() WHERE id = $1"
        f" RETURNING {USER_COLUMNS}",
        user_id,
        timeout=_t(),
    )
    return row


async def tasks_created_by(conn: asyncpg.Connection, user_id: uuid.UUID) -> int:
    """How many tasks `user_id` created."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE created_by = $1", user_id, timeout=_t()
    )
    return count


async def tasks_assigned_to(
    conn: asyncpg.Connection, user_id: uuid.UUID
) -> Sequence[asyncpg.Record]:
    """Tasks assigned to `user_id`, locked."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE assigned_to = $1 ORDER BY id FOR UPDATE",
        user_id,
        timeout=_t(),
    )
    return rows


async def delete_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> bool:
    """Delete a user.

    Raises:
        StillReferenced: Tasks they created refer to them.
    """
    try:
        status: str = await conn.execute("DELETE FROM users WHERE id = $1", user_id, timeout=_t())
    except asyncpg.ForeignKeyViolationError:
        raise StillReferenced() from None
    return status.endswith(" 1")


# --- outbox -----------------------------------------------------------------------------------


async def claim_pending_events(conn: asyncpg.Connection, *, limit: int) -> Sequence[asyncpg.Record]:
    """Lock the oldest undelivered events this relay may send now, keeping per-task order.

    Rows other relays hold are skipped (SKIP LOCKED). An event is only claimed when no earlier
    undelivered event of the same task is held elsewhere, so two relays never send one task's
    events out of order.
    """
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        WITH claimed AS (
            SELECT id, event_id, task_id, event_type, user_id, details, request_id,
                   traceparent, occurred_at
            FROM outbox
            WHERE delivered_at IS NULL
            ORDER BY id
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        )
        SELECT c.* FROM claimed c
        WHERE NOT EXISTS (
            SELECT 1 FROM outbox o
            WHERE o.task_id = c.task_id AND o.delivered_at IS NULL AND o.id < c.id
              AND o.id NOT IN (SELECT id FROM claimed)
        )
        ORDER BY c.id
        """,
        limit,
        timeout=_t(),
    )
    return rows


async def mark_delivered(conn: asyncpg.Connection, ids: Sequence[int]) -> None:
    """Mark events delivered."""
    await conn.execute(
        "UPDATE outbox SET delivered_at = now() WHERE id = ANY($1::bigint[])",
        list(ids),
        timeout=_t(),
    )


async def outbox_backlog(conn: asyncpg.Connection) -> tuple[int, float]:
    """(undelivered events, age in seconds of the oldest one)."""
    row = await conn.fetchrow(
        """
        SELECT count(*) AS depth,
               coalesce(extract(epoch FROM now() - min(occurred_at)), 0) AS lag
        FROM outbox WHERE delivered_at IS NULL
        """,
        timeout=_t(),
    )
    return int(row["depth"]), float(row["lag"])


async def purge_delivered(conn: asyncpg.Connection, *, older_than: dt.timedelta) -> int:
    """Delete delivered events older than `older_than`; returns how many."""
    status: str = await conn.execute(
        "DELETE FROM outbox WHERE delivered_at < now() - $1::interval", older_than, timeout=_t()
    )
    return int(status.rsplit(" ", 1)[-1])


async def schema_size(conn: asyncpg.Connection) -> int:
    """Bytes used by the task schema's tables and indexes."""
    size: int = await conn.fetchval(
        """
        SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'task' AND c.relkind IN ('r', 'm')
        """,
        timeout=_t(),
    )
    return size
