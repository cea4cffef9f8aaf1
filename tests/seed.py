"""Rows for every table, written as the services would write them, straight into PostgreSQL.

`seed_every_table` puts a few rows in every table of the task, audit and webhook schemas,
including the rows each down migration declares it would destroy (``-- mhv:loses``), for the
migration and backup tests. `bulk_load` writes many tasks fast (COPY) with their outbox events
delivered and their audit chain appended, for the disaster-recovery drill and verification.

Audit rows are chained with the audit service's own code (`mhv_audit.link`), so the service's
verifier accepts them.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import asyncpg

from mhv_audit import ChainedEvent, NewEvent, canonical_json, link
from mhv_cli.migrate import RoleNames, drop_roles, migrate_up
from mhv_common.timestamps import to_micros
from tests.harness import with_database

SERVICE_SCHEMAS = ("task", "audit", "webhook")


async def _admin(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def scratch_database(
    admin_url: str, prefix: str, *, seed: bool = False, passwords: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, RoleNames]]:
    """A new database with its own roles, migrated (and seeded), dropped afterwards.

    Yields its administrator URL and role names.
    """
    name = f"{prefix}_{secrets.token_hex(4)}"
    roles = RoleNames(name)
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    try:
        await migrate_up(url, roles=roles, passwords=passwords)
        if seed:
            conn = await asyncpg.connect(url)
            try:
                await seed_every_table(conn)
            finally:
                await conn.close()
        yield url, roles
    finally:
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await drop_roles(admin_url, roles=roles)


def task_created(task_id: int, user_id: str, title: str, occurred: dt.datetime) -> NewEvent:
    """The audit event of a task's creation, as the relay would send it."""
    details = {"title": title, "status": "pending", "repository": "demo", "priority": "medium"}
    return NewEvent(
        event_id=str(uuid.uuid4()),
        task_id=task_id,
        event_type="task_created",
        user_id=user_id,
        details=canonical_json(json.dumps(details)),
        occur_us=to_micros(occurred),
        request_id="",
        trace_id="",
    )


async def chain_head(conn: asyncpg.Connection) -> tuple[int, bytes]:
    """The audit chain head: last id and hash."""
    row = await conn.fetchrow("SELECT last_id, last_hash FROM audit.chain_head")
    assert row is not None
    return int(row["last_id"]), bytes(row["last_hash"])


def _audit_record(row: ChainedEvent) -> tuple[object, ...]:
    e = row.event
    created = dt.datetime.fromtimestamp(row.created_us / 1e6, dt.UTC)
    occurred = dt.datetime.fromtimestamp(e.occur_us / 1e6, dt.UTC)
    return (
        row.id,
        uuid.UUID(e.event_id),
        e.task_id,
        e.event_type,
        uuid.UUID(e.user_id),
        e.details,
        occurred,
        created,
        e.request_id,
        e.trace_id,
        row.prev_hash,
        row.hash,
        e.subject_kind,
        e.subject_id,
    )


_AUDIT_COLUMNS = [
    "id",
    "event_id",
    "task_id",
    "event_type",
    "user_id",
    "details_canonical",
    "occur_time",
    "created_at",
    "request_id",
    "trace_id",
    "prev_hash",
    "hash",
    "subject_kind",
    "subject_id",
]


async def append_audit(conn: asyncpg.Connection, events: Sequence[NewEvent]) -> list[ChainedEvent]:
    """Append `events` to the audit chain (as an administrator), moving the head."""
    if not events:
        return []
    head_id, head_hash = await chain_head(conn)
    # Whole microseconds, as the audit service stores them.
    now_us = to_micros(dt.datetime.now(dt.UTC))
    rows = link(events, head_id=head_id, head_hash=head_hash, created_us=now_us)
    async with conn.transaction():
        await conn.copy_records_to_table(
            "task_audit_log",
            schema_name="audit",
            columns=_AUDIT_COLUMNS,
            records=[_audit_record(r) for r in rows],
        )
        await conn.execute(
            "UPDATE audit.chain_head SET last_id = $1, last_hash = $2, updated_at = now()",
            rows[-1].id,
            rows[-1].hash,
        )
    return rows


async def seed_every_table(conn: asyncpg.Connection) -> None:
    """A few rows in every table of the service schemas (see the module docstring)."""
    users = [uuid.uuid4() for _ in range(3)]
    for index, user in enumerate(users):
        await conn.execute(
            "INSERT INTO task.users (id, username, email, display_name, metadata)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            user,
            f"seed-user-{index}",
            f"seed-{index}@example.org",
            f"Seed User {index}",
            json.dumps({"team": "seed"}),
        )
    tasks = []
    for index in range(5):
        task_id = await conn.fetchval(
            "INSERT INTO task.tasks (title, description, repository, priority, status,"
            " created_by, assigned_to, metadata, request_key, request_fingerprint)"
            " VALUES ($1, $2, 'demo', $3::task.task_priority, $4::task.task_status, $5, $6,"
            " $7::jsonb, $8, $9) RETURNING id",
            f"Seed task {index} 'quoted' — ünïcode",
            "seeded for the migration and backup tests",
            ("low", "medium", "high", "critical", "medium")[index],
            ("pending", "in_progress", "completed", "blocked", "cancelled")[index],
            users[index % 3],
            users[(index + 1) % 3] if index % 2 else None,
            json.dumps({"seed": index}),
            f"seed:{index}",
            f"fp{index}",
        )
        tasks.append((task_id, users[index % 3]))
    now = dt.datetime.now(dt.UTC)
    events = [
        task_created(task_id, str(user), f"Seed task {i}", now)
        for i, (task_id, user) in enumerate(tasks)
    ]
    await append_audit(conn, events[:4])
    # Four events delivered (and in the audit log), one still waiting for the relay.
    for index, event in enumerate(events):
        await conn.execute(
            "INSERT INTO task.outbox (event_id, task_id, event_type, user_id, details,"
            " request_id, occurred_at, delivered_at) VALUES ($1, $2, $3, $4, $5::jsonb, '', $6,"
            " $7)",
            uuid.UUID(event.event_id),
            event.task_id,
            event.event_type,
            uuid.UUID(event.user_id),
            event.details,
            now,
            now if index < 4 else None,
        )
    if await conn.fetchval(
        "SELECT true FROM information_schema.columns"
        " WHERE table_schema = 'task' AND table_name = 'outbox' AND column_name = 'subject_kind'"
    ):
        # User management is audited through the same outbox (a user's creation, waiting).
        await conn.execute(
            "INSERT INTO task.outbox (task_id, event_type, user_id, details, subject_kind,"
            " subject_id) VALUES (0, 'user_created', $1, '{\"username\": \"new\"}', 'user', $2)",
            users[0],
            str(uuid.uuid4()),
        )
    if await conn.fetchval("SELECT to_regclass('task.task_embeddings') IS NOT NULL"):
        # Semantic search's tables, where the server offers pgvector (the backlog fills itself
        # from the tasks' insert trigger).
        for task_id, _user in tasks[:2]:
            await conn.execute(
                "INSERT INTO task.task_embeddings (task_id, model, dimensions, embedding,"
                " content_sha256) VALUES ($1, 'seed-model', 3, '[0.1,0.2,0.3]'::task.vector,"
                " sha256('seed'::bytea))",
                task_id,
            )
    deliveries = [uuid.uuid4() for _ in range(4)]
    for index, delivery in enumerate(deliveries):
        await conn.execute(
            "INSERT INTO webhook.dedup (source, key_kind, key)"
            " VALUES ('github', 'delivery_id', $1)",
            f"seed-delivery-{index}",
        )
        await conn.execute(
            "INSERT INTO webhook.deliveries (id, source, delivery_id, event, action, headers,"
            " body, state, leased_by, leased_until) VALUES ($1, 'github', $2, 'issues', 'opened',"
            " $3::jsonb, $4, $5, $6, $7)",
            delivery,
            f"seed-delivery-{index}",
            json.dumps({"content-type": "application/json"}),
            json.dumps({"seed": index}).encode(),
            ("completed", "pending", "processing", "dead_letter")[index],
            "worker-1" if index == 2 else None,
            now + dt.timedelta(minutes=1) if index == 2 else None,
        )
        await conn.execute(
            "INSERT INTO webhook.saga_log (delivery_id, step, state, task_id, user_id,"
            " idempotency_key, created_task) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            delivery,
            ("done", "started", "create_task", "started")[index],
            ("completed", "running", "running", "failed")[index],
            tasks[index][0] if index == 0 else None,
            tasks[index][1],
            f"seed-saga-{index}",
            index == 0,
        )
    await conn.execute(
        "INSERT INTO webhook.dedup (source, key_kind, key) VALUES ('gitlab', 'body_sha256', $1)",
        "0" * 64,
    )
    links = [
        # A finished link, an unfinished claim (no task yet), and a link whose delivery was
        # purged after its retention.
        ("example/demo#1", tasks[0][0], deliveries[0]),
        ("example/demo#2", None, deliveries[2]),
        ("example/demo#3", tasks[1][0], uuid.uuid4()),
    ]
    for key, task_id, delivery in links:
        await conn.execute(
            "INSERT INTO webhook.issue_links (source, external_key, task_id, delivery)"
            " VALUES ('github', $1, $2, $3)",
            key,
            task_id,
            delivery,
        )
    if await conn.fetchval("SELECT to_regclass('webhook.outbox') IS NOT NULL"):
        # An operator's retry, recorded for the audit log and not yet relayed.
        await conn.execute(
            "INSERT INTO webhook.outbox (event_type, user_id, details, subject_kind, subject_id)"
            " VALUES ('delivery_retried', $1, '{\"source\": \"github\"}', 'delivery', $2)",
            users[0],
            str(deliveries[0]),
        )


async def empty_tables(conn: asyncpg.Connection) -> list[str]:
    """Tables of the service schemas that hold no row."""
    tables = await conn.fetch(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY($1::text[])"
        " ORDER BY 1, 2",
        list(SERVICE_SCHEMAS),
    )
    empty = []
    for t in tables:
        name = f'"{t["schemaname"]}"."{t["tablename"]}"'
        if not await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {name})"):
            empty.append(f"{t['schemaname']}.{t['tablename']}")
    return empty


async def bulk_load(
    conn: asyncpg.Connection,
    *,
    tasks: int,
    users: int = 100,
    batch: int = 50_000,
    progress: Callable[[int], None] | None = None,
) -> None:
    """`tasks` tasks by `users` users, each with its delivered outbox event and audit row.

    Written with COPY in batches of `batch`, in one transaction per batch; `progress` is told
    how many tasks are done after each batch.
    """
    user_ids = [uuid.uuid4() for _ in range(users)]
    await conn.copy_records_to_table(
        "users",
        schema_name="task",
        columns=["id", "username", "email", "display_name"],
        records=[
            (u, f"load-{u.hex[:12]}", f"load-{u.hex[:12]}@example.org", "Load user")
            for u in user_ids
        ],
    )
    done = 0
    while done < tasks:
        count = min(batch, tasks - done)
        now = dt.datetime.now(dt.UTC)
        async with conn.transaction():
            first = await conn.fetchval(
                "SELECT nextval(pg_get_serial_sequence('task.tasks', 'id'))"
            )
            # Ids reserved for this batch: the identity sequence moves past them.
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence('task.tasks', 'id'), $1)", first + count - 1
            )
            ids = range(first, first + count)
            owners = [user_ids[i % users] for i in ids]
            titles = [f"Load task {i}: fix the flaky build on branch {i % 97}" for i in ids]
            await conn.execute(
                "INSERT INTO task.tasks (id, title, description, repository, priority,"
                " created_by, created_at, updated_at) OVERRIDING SYSTEM VALUE"
                " SELECT i, t, 'Seeded by the drill', 'demo', 'medium', u, $4, $4"
                " FROM unnest($1::bigint[], $2::text[], $3::uuid[]) AS x(i, t, u)",
                list(ids),
                titles,
                owners,
                now,
            )
            events = [
                task_created(i, str(u), t, now) for i, u, t in zip(ids, owners, titles, strict=True)
            ]
            await conn.copy_records_to_table(
                "outbox",
                schema_name="task",
                columns=[
                    "event_id",
                    "task_id",
                    "event_type",
                    "user_id",
                    "details",
                    "occurred_at",
                    "delivered_at",
                ],
                records=[
                    (
                        uuid.UUID(e.event_id),
                        e.task_id,
                        e.event_type,
                        uuid.UUID(e.user_id),
                        e.details,
                        now,
                        now,
                    )
                    for e in events
                ],
            )
            await append_audit(conn, events)
        done += count
        if progress is not None:
            progress(done)
