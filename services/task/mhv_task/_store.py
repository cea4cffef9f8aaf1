"""SQL for users, tasks and the outbox. The only module of the task service that holds SQL.

Every statement takes its values as parameters; the few dynamic fragments (which filters are
present, which columns an update sets) come from fixed whitelists, never from input. Every
function takes a keyword-only `timeout`: the caller passes what is left of its deadline
(`mhv_common.context.time_left()`). Reads return the domain's objects (`mhv_task._models`),
changes take their audit event (`mhv_task._events.OutboxEvent`) and write it in the same
statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from mhv_common import db, outbox
from mhv_task._events import OutboxEvent
from mhv_task._lifecycle import Status
from mhv_task._models import QualityGate, Task, TaskCreateRequest, User

TASK_COLUMNS = (
    "id, title, description, repository, priority::text AS priority, status::text AS status, "
    "status_before_block::text AS status_before_block, deadline, created_by, assigned_to, "
    "metadata, blocked_reason, cancel_reason, quality_gate, created_at, updated_at, "
    "started_at, completed_at, version, request_fingerprint"
)
# In the order of `mhv_task._models.User`'s fields.
USER_COLUMNS = (
    "id, username, email, display_name, is_active, metadata, created_at, updated_at, last_login_at"
)
# Columns UpdateTask and the transitions may set, and their SQL casts.
_SETTABLE: dict[str, str] = {
    "title": "",
    "description": "",
    "priority": "::task_priority",
    "deadline": "",
    "metadata": "::jsonb",
    "repository": "",
    "status": "::task_status",
    "status_before_block": "::task_status",
    "assigned_to": "::uuid",
    "blocked_reason": "",
    "cancel_reason": "",
    "quality_gate": "::jsonb",
    "started_at": "",
    "completed_at": "",
}


def task_from_row(row: asyncpg.Record) -> Task:
    gate = row["quality_gate"]
    before = row["status_before_block"]
    return Task(
        id=row["id"],
        title=row["title"],
        description=row["description"],
        repository=row["repository"],
        priority=row["priority"],
        status=Status(row["status"]),
        status_before_block=Status(before) if before else None,
        deadline=row["deadline"],
        created_by=row["created_by"],
        assigned_to=row["assigned_to"],
        metadata=row["metadata"],
        blocked_reason=row["blocked_reason"],
        cancel_reason=row["cancel_reason"],
        quality_gate=QualityGate.from_stored(gate) if gate else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        version=row["version"],
    )


def _user(row: asyncpg.Record) -> User:
    return User(*row.values())


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
    SELECT t.id, $14, $1, $11::jsonb, $12, $13 FROM t
)
SELECT {TASK_COLUMNS} FROM t
"""  # nosec B608: constant columns and clauses; values are bound


async def insert_task(
    conn: asyncpg.Connection,
    task: TaskCreateRequest,
    *,
    event: OutboxEvent,
    request_key: str | None,
    request_fingerprint: str | None,
    timeout: float | None,
) -> Task | None:
    """Insert a task and its task_created event in one statement.

    The task's author is the event's actor. Returns None when nothing was inserted: the
    request key exists already, or the author or assignee is missing or inactive (the caller
    finds out which).
    """
    row: asyncpg.Record | None = await conn.fetchrow(
        _INSERT_TASK,
        event.actor,
        task.assigned_to,
        task.title,
        task.description,
        task.repository,
        task.priority,
        task.deadline,
        task.metadata,
        request_key,
        request_fingerprint,
        event.details,
        event.request_id,
        event.traceparent,
        event.event_type.value,
        timeout=timeout,
    )
    return None if row is None else task_from_row(row)


async def task_by_request_key(
    conn: asyncpg.Connection, key: str, *, timeout: float | None
) -> tuple[Task, str | None] | None:
    """The task created under an idempotency key, and the fingerprint of its request."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE request_key = $1",  # nosec B608: constant columns and clauses; values are bound
        key,
        timeout=timeout,
    )
    return None if row is None else (task_from_row(row), row["request_fingerprint"])


async def get_task(
    conn: asyncpg.Connection, task_id: int, *, for_update: bool = False, timeout: float | None
) -> Task | None:
    """One task, optionally locked until the end of the transaction."""
    lock = " FOR UPDATE" if for_update else ""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1{lock}",  # nosec B608: constant columns and clauses; values are bound
        task_id,
        timeout=timeout,
    )
    return None if row is None else task_from_row(row)


async def update_task(
    conn: asyncpg.Connection,
    task_id: int,
    changes: Mapping[str, Any],
    *,
    event: OutboxEvent,
    timeout: float | None,
) -> Task:
    """Apply `changes`, bump the version and record `event`, in one statement.

    Args:
        conn: A connection inside the caller's transaction (which holds the row lock).
        task_id: The task.
        changes: Column -> new value; columns must be in the settable whitelist.
        event: The change's audit event.
        timeout: Bound on the statement.
    """
    sets: list[str] = []
    args: list[Any] = [task_id]
    for column, value in changes.items():
        cast = _SETTABLE[column]  # KeyError for anything outside the whitelist
        args.append(value)
        sets.append(f"{column} = ${len(args)}{cast}")
    args.extend(
        [event.event_type.value, event.actor, event.details, event.request_id, event.traceparent]
    )
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
    """  # nosec B608: constant columns and clauses; values are bound
    row: asyncpg.Record = await conn.fetchrow(sql, *args, timeout=timeout)
    return task_from_row(row)


async def delete_task(
    conn: asyncpg.Connection, task_id: int, *, event: OutboxEvent, timeout: float | None
) -> bool:
    """Delete a task and record `event` (task_deleted), in one statement."""
    deleted = await conn.fetchval(
        """
        WITH t AS (DELETE FROM tasks WHERE id = $1 RETURNING id), event AS (
            INSERT INTO outbox (task_id, event_type, user_id, details, request_id, traceparent)
            SELECT t.id, $2, $3, $4::jsonb, $5, $6 FROM t
        )
        SELECT count(*) FROM t
        """,
        task_id,
        event.event_type.value,
        event.actor,
        event.details,
        event.request_id,
        event.traceparent,
        timeout=timeout,
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
    timeout: float | None,
) -> list[Task]:
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
        f"SELECT {TASK_COLUMNS} FROM tasks {clause} ORDER BY id DESC LIMIT ${len(args)}",  # nosec B608: constant columns and clauses; values are bound
        *args,
        timeout=timeout,
    )
    return [task_from_row(row) for row in rows]


async def search_tasks(
    conn: asyncpg.Connection,
    *,
    query: str,
    filters: Mapping[str, Any],
    after: tuple[float, int] | None,
    limit: int,
    timeout: float | None,
    not_embedded_by: str | None = None,
) -> list[tuple[Task, float]]:
    """Full-text matches for `query` and their rank, best first (rank, then newest).

    With `not_embedded_by` (a model name), only tasks that have no vector of that model or
    wait in the embedding backlog (semantic search cannot see their current text yet).
    """
    args: list[Any] = [query]
    where = ["search_vector @@ q"]
    for name in ("repository", "status"):
        if filters.get(name) is not None:
            args.append(filters[name])
            where.append(_LIST_FILTERS[name].format(len(args)))
    if not_embedded_by is not None:
        args.append(not_embedded_by)
        where.append(
            "(EXISTS (SELECT 1 FROM embedding_backlog b WHERE b.task_id = tasks.id)"
            " OR NOT EXISTS (SELECT 1 FROM task_embeddings e"
            f" WHERE e.task_id = tasks.id AND e.model = ${len(args)}))"  # nosec B608: values are bound
        )
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
        """,  # nosec B608: constant columns and clauses; values are bound
        *args,
        timeout=timeout,
    )
    return [(task_from_row(row), float(row["rank"])) for row in rows]


# --- users ------------------------------------------------------------------------------------


async def user_state(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, lock: bool = False, timeout: float | None
) -> bool | None:
    """True for an active user, False for a deactivated one, None for no such user.

    With `lock`, the answer holds until the transaction ends: the row is locked FOR SHARE, so
    a concurrent deactivation or deletion waits for it (and then sees what it committed).
    """
    value: bool | None = await conn.fetchval(
        "SELECT is_active FROM users WHERE id = $1" + (" FOR SHARE" if lock else ""),  # nosec B608: constant columns and clauses; values are bound
        user_id,
        timeout=timeout,
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
    user_id: uuid.UUID,
    username: str,
    email: str,
    display_name: str | None,
    metadata: Mapping[str, Any],
    timeout: float | None,
) -> User:
    """Insert a user.

    Raises:
        Taken: The username or the email belongs to another user.
    """
    try:
        row: asyncpg.Record = await conn.fetchrow(
            "INSERT INTO users (id, username, email, display_name, metadata)"
            f" VALUES ($5, $1, $2, $3, $4) RETURNING {USER_COLUMNS}",  # nosec B608: constant columns and clauses; values are bound
            username,
            email,
            display_name,
            dict(metadata),
            user_id,
            timeout=timeout,
        )
    except asyncpg.UniqueViolationError as exc:
        raise Taken("email" if "email" in (exc.constraint_name or "") else "username") from None
    return _user(row)


async def get_user(
    conn: asyncpg.Connection,
    *,
    user_id: uuid.UUID | None = None,
    username: str | None = None,
    for_update: bool = False,
    timeout: float | None,
) -> User | None:
    """One user by id or by username, optionally locked until the end of the transaction."""
    if user_id is not None:
        lock = " FOR UPDATE" if for_update else ""
        row: asyncpg.Record | None = await conn.fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE id = $1{lock}",  # nosec B608: constant columns and clauses; values are bound
            user_id,
            timeout=timeout,
        )
    else:
        row = await conn.fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE username = $1",  # nosec B608: constant columns and clauses; values are bound
            username,
            timeout=timeout,
        )
    return None if row is None else _user(row)


async def list_users(
    conn: asyncpg.Connection,
    *,
    after_username: str | None,
    include_inactive: bool,
    limit: int,
    timeout: float | None,
) -> list[User]:
    """Users by username."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        SELECT {USER_COLUMNS} FROM users
        WHERE ($1::text IS NULL OR username > $1) AND ($2 OR is_active)
        ORDER BY username LIMIT $3
        """,  # nosec B608: constant columns and clauses; values are bound
        after_username,
        include_inactive,
        limit,
        timeout=timeout,
    )
    return [_user(row) for row in rows]


async def deactivate_user(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, timeout: float | None
) -> User | None:
    """Mark a user inactive."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"UPDATE users SET is_active = false, updated_at = now() WHERE id = $1"  # nosec B608: constant columns and clauses; values are bound
        f" RETURNING {USER_COLUMNS}",
        user_id,
        timeout=timeout,
    )
    return None if row is None else _user(row)


async def tasks_created_by(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, timeout: float | None
) -> int:
    """How many tasks `user_id` created."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM tasks WHERE created_by = $1", user_id, timeout=timeout
    )
    return count


async def tasks_assigned_to(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, timeout: float | None
) -> list[int]:
    """Ids of the tasks assigned to `user_id`, locked until the end of the transaction."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT id FROM tasks WHERE assigned_to = $1 ORDER BY id FOR UPDATE",
        user_id,
        timeout=timeout,
    )
    return [row["id"] for row in rows]


async def delete_user(
    conn: asyncpg.Connection, user_id: uuid.UUID, *, timeout: float | None
) -> bool:
    """Delete a user.

    Raises:
        StillReferenced: Tasks they created refer to them.
    """
    try:
        status: str = await conn.execute(
            "DELETE FROM users WHERE id = $1", user_id, timeout=timeout
        )
    except asyncpg.ForeignKeyViolationError:
        raise StillReferenced() from None
    return status.endswith(" 1")


# --- outbox -----------------------------------------------------------------------------------


async def insert_user_event(
    conn: asyncpg.Connection, event: OutboxEvent, *, timeout: float | None
) -> None:
    """Write a user event to the outbox (in the caller's transaction, with its change)."""
    await outbox.insert_subject_event(
        conn,
        outbox.SubjectEvent(
            event.event_type.value,
            event.actor,
            event.subject_kind,
            event.subject_id,
            event.details,
            event.request_id,
            event.traceparent,
        ),
        timeout=timeout,
    )


async def schema_size(conn: asyncpg.Connection, *, timeout: float | None) -> int:
    """Bytes used by the task schema's tables and indexes (`mhv_common.db.schema_size`)."""
    return await db.schema_size(conn, "task", timeout=timeout)
