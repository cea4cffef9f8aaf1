"""Each service's login role owns its schema and has no rights on the others."""

from __future__ import annotations

import asyncpg
import pytest

from tests.harness import Deployment

SLICES = ("task", "audit", "webhook")


async def _as(deployment: Deployment, slice_name: str) -> asyncpg.Connection:
    return await asyncpg.connect(deployment.role_url(slice_name))


# The audit schema belongs to a NOLOGIN owner role, and its login role may only append and read
# (tests/audit/test_schema.py).
@pytest.mark.parametrize("own", [s for s in SLICES if s != "audit"])
async def test_role_can_work_in_its_own_schema(deployment: Deployment, own: str) -> None:
    conn = await _as(deployment, own)
    try:
        assert await conn.fetchval("SHOW search_path") == own
        await conn.execute("CREATE TABLE own_schema_probe (id int)")
        await conn.execute("INSERT INTO own_schema_probe VALUES (1)")
        assert await conn.fetchval(f"SELECT count(*) FROM {own}.own_schema_probe") == 1
        await conn.execute("DROP TABLE own_schema_probe")
    finally:
        await conn.close()


@pytest.mark.parametrize(("who", "other"), [(a, b) for a in SLICES for b in SLICES if a != b])
async def test_role_is_refused_on_other_schemas(
    deployment: Deployment, who: str, other: str
) -> None:
    conn = await _as(deployment, who)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"CREATE TABLE {other}.intruder (id int)")
        # Tables that exist there are out of reach too (no USAGE on the schema).
        table = await _some_table(deployment, other)
        if table is not None:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f"SELECT * FROM {other}.{table} LIMIT 1")
    finally:
        await conn.close()


async def _some_table(deployment: Deployment, schema: str) -> str | None:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        name = await conn.fetchval(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY 1 LIMIT 1", schema
        )
        return str(name) if name is not None else None
    finally:
        await conn.close()


@pytest.mark.parametrize("who", SLICES)
async def test_role_cannot_touch_public_or_migration_history(
    deployment: Deployment, who: str
) -> None:
    conn = await _as(deployment, who)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.intruder (id int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM mhv_meta.schema_migrations")
    finally:
        await conn.close()


@pytest.mark.parametrize("who", SLICES)
async def test_roles_are_not_privileged(deployment: Deployment, who: str) -> None:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        row = await conn.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles"
            " WHERE rolname = $1",
            deployment.roles.for_slice(who),
        )
    finally:
        await conn.close()
    assert row is not None
    assert not any(row.values())
