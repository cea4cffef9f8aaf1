"""The audit schema is append-only in the database itself (migrations/audit)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from mhv_audit._chain import NewEvent
from mhv_audit._store import _DETAILS_GENERATED
from mhv_cli.migrate import migrate_down
from mhv_common.timestamps import to_micros
from tests.harness import Cluster, Deployment
from tests.seed import append_audit, scratch_database


@pytest.fixture
async def audit_conn(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the audit service's login role."""
    conn = await asyncpg.connect(deployment.role_url("audit"))
    yield conn
    await conn.close()


@pytest.fixture
async def admin_conn(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection."""
    conn = await asyncpg.connect(deployment.admin_url)
    yield conn
    await conn.close()


def _owner(deployment: Deployment) -> str:
    return deployment.roles.all()["audit_owner_role"]


async def test_schema_and_tables_belong_to_a_nologin_owner_without_members(
    deployment: Deployment, admin_conn: asyncpg.Connection
) -> None:
    owner = _owner(deployment)
    assert (
        await admin_conn.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'audit'"
        )
        == owner
    )
    tables = await admin_conn.fetch(
        "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'audit' ORDER BY 1"
    )
    assert [(t["tablename"], t["tableowner"]) for t in tables] == [
        ("chain_head", owner),
        ("task_audit_log", owner),
    ]
    role = await admin_conn.fetchrow(
        "SELECT rolcanlogin, rolsuper, rolinherit, rolbypassrls FROM pg_roles WHERE rolname = $1",
        owner,
    )
    assert role is not None and not any(role.values())
    members = await admin_conn.fetchval(
        "SELECT count(*) FROM pg_auth_members WHERE roleid = $1::regrole", owner
    )
    assert members == 0


async def test_login_role_may_only_insert_and_select_rows(
    deployment: Deployment, admin_conn: asyncpg.Connection
) -> None:
    role = deployment.roles.for_slice("audit")
    granted = {
        privilege
        for privilege in (
            "SELECT",
            "INSERT",
            "UPDATE",
            "DELETE",
            "TRUNCATE",
            "REFERENCES",
            "TRIGGER",
        )
        if await admin_conn.fetchval(
            "SELECT has_table_privilege($1, 'audit.task_audit_log', $2)", role, privilege
        )
    }
    assert granted == {"SELECT", "INSERT"}
    # The chain head: readable, and movable (which also lets the role lock it).
    head_columns = await admin_conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'audit.chain_head'::regclass"
        " AND attnum > 0 AND has_column_privilege($1, attrelid, attnum, 'UPDATE') ORDER BY 1",
        role,
    )
    assert [c["attname"] for c in head_columns] == ["last_hash", "last_id", "updated_at"]
    for privilege in ("INSERT", "DELETE", "TRUNCATE"):
        assert not await admin_conn.fetchval(
            "SELECT has_table_privilege($1, 'audit.chain_head', $2)", role, privilege
        )
    assert not await admin_conn.fetchval("SELECT has_schema_privilege($1, 'audit', 'CREATE')", role)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE task_audit_log SET task_id = task_id",
        "DELETE FROM task_audit_log",
        "TRUNCATE task_audit_log",
        "INSERT INTO task_audit_log (id, event_id, task_id, event_type, user_id,"
        " details_canonical, occur_time, prev_hash, hash) SELECT id, event_id, task_id,"
        " event_type, user_id, details_canonical, occur_time, prev_hash, hash"
        " FROM task_audit_log ON CONFLICT (id) DO UPDATE SET task_id = excluded.task_id",
        "ALTER TABLE task_audit_log DISABLE TRIGGER USER",
        "DROP TABLE task_audit_log",
        "CREATE TABLE audit.shadow_log (id int)",
        "CREATE FUNCTION audit.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "DELETE FROM chain_head",
        "TRUNCATE chain_head",
    ],
)
async def test_login_role_is_refused(audit_conn: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await audit_conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit.task_audit_log SET task_id = task_id",
        "UPDATE audit.task_audit_log SET task_id = task_id WHERE false",
        "DELETE FROM audit.task_audit_log",
        "DELETE FROM audit.task_audit_log WHERE false",
        "TRUNCATE audit.task_audit_log",
    ],
)
async def test_triggers_refuse_even_the_owner(
    deployment: Deployment, admin_conn: asyncpg.Connection, statement: str
) -> None:
    async with admin_conn.transaction():
        await admin_conn.execute(f'SET LOCAL ROLE "{_owner(deployment)}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await admin_conn.execute(statement)


async def test_triggers_refuse_a_superuser_who_leaves_them_on(
    admin_conn: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await admin_conn.execute("DELETE FROM audit.task_audit_log WHERE false")


async def test_an_insert_that_does_not_link_to_its_predecessor_is_refused(
    audit_conn: asyncpg.Connection,
) -> None:
    head = await audit_conn.fetchrow("SELECT last_id, last_hash FROM chain_head")
    assert head is not None
    insert = (
        "INSERT INTO task_audit_log (id, event_id, task_id, event_type, user_id,"
        " details_canonical, occur_time, prev_hash, hash) VALUES ($1, gen_random_uuid(), 1,"
        " 'task_created',"
        " gen_random_uuid(), '{}', now(), $2, $3)"
    )
    # Past the next id (a gap), or at the next id with a wrong link: both refused.
    with pytest.raises(asyncpg.DataCorruptedError, match="does not link"):
        await audit_conn.execute(insert, head["last_id"] + 2, head["last_hash"], bytes(32))
    with pytest.raises(asyncpg.DataCorruptedError, match=r"does not link|genesis"):
        await audit_conn.execute(insert, head["last_id"] + 1, b"\x01" * 32, bytes(32))


async def test_the_chain_head_only_moves_forward_and_only_to_the_last_row(
    audit_conn: asyncpg.Connection,
) -> None:
    # Staying put is not moving forward either (and works on an empty log too).
    with pytest.raises(asyncpg.DataCorruptedError, match="only moves forward"):
        await audit_conn.execute("UPDATE chain_head SET last_id = last_id")
    # Forward, but to a row that does not exist: refused when the transaction commits.
    with pytest.raises(asyncpg.DataCorruptedError, match="not the last row"):
        async with audit_conn.transaction():
            await audit_conn.execute("UPDATE chain_head SET last_id = last_id + 1000000")


async def test_the_plan_indexes_exist(admin_conn: asyncpg.Connection) -> None:
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await admin_conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'audit'"
            " AND tablename = 'task_audit_log'"
        )
    }
    assert "(task_id, id)" in indexes["idx_task_audit_log_task_id"]
    assert "(user_id, id)" in indexes["idx_task_audit_log_user_id"]
    assert "(created_at)" in indexes["idx_task_audit_log_created_at"]
    assert "(event_type, id)" in indexes["idx_task_audit_log_event_type"]
    assert any("UNIQUE" in d and "(event_id)" in d for d in indexes.values())


async def test_details_is_generated_from_the_hashed_text(audit_conn: asyncpg.Connection) -> None:
    # Verification relies on this (checked in the catalog) to skip comparing every row's jsonb.
    assert await audit_conn.fetchval(_DETAILS_GENERATED) is True
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await audit_conn.execute(
            "INSERT INTO task_audit_log (id, event_id, task_id, event_type, user_id,"
            " details_canonical, details, occur_time, prev_hash, hash) VALUES (1,"
            " gen_random_uuid(), 1, 'task_created', gen_random_uuid(), '{}', '{}', now(),"
            " $1, $1)",
            bytes(32),
        )


async def test_reverting_subjects_is_refused_while_the_log_holds_rows_about_other_subjects(
    cluster: Cluster,
) -> None:
    """Dropping the subject columns would turn those rows into task rows that fail to verify."""
    async with scratch_database(cluster.admin_url, "mhvsubj") as (url, roles):
        conn = await asyncpg.connect(url)
        try:
            user = str(uuid.uuid4())
            await append_audit(
                conn,
                [
                    NewEvent(
                        event_id=str(uuid.uuid4()),
                        task_id=0,
                        event_type="user_created",
                        user_id=user,
                        details='{"username":"ada"}',
                        occur_us=to_micros(dt.datetime.now(dt.UTC)),
                        request_id="",
                        trace_id="",
                        subject_kind="user",
                        subject_id=user,
                    )
                ],
            )
            with pytest.raises(asyncpg.ObjectInUseError, match="reverting would break the chain"):
                await migrate_down(url, slice_name="audit", to_version=2, roles=roles)
            assert (
                await conn.fetchval(
                    "SELECT max(version) FROM mhv_meta.schema_migrations WHERE slice = 'audit'"
                )
                == 3
            )
            assert (
                await conn.fetchval(
                    "SELECT subject_id FROM audit.task_audit_log WHERE subject_kind = 'user'"
                )
                == user
            )
        finally:
            await conn.close()
