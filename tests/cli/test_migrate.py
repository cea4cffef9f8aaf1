"""The migration runner: ordering, idempotence, checksums, down migrations, the lock."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mhv_cli.migrate import (
    MIGRATIONS_DIR,
    Migration,
    RoleNames,
    available_extensions,
    discover,
    drop_roles,
    held_back,
    migrate_down,
    migrate_up,
)
from mhv_common.errors import ConfigurationError
from tests.harness import Cluster, with_database


@pytest.fixture
async def empty_db(cluster: Cluster) -> AsyncIterator[tuple[str, RoleNames]]:
    name = f"mhvmig_{secrets.token_hex(4)}"
    roles = RoleNames(name)
    conn = await asyncpg.connect(cluster.admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    yield with_database(cluster.admin_url, name), roles
    conn = await asyncpg.connect(cluster.admin_url)
    await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await conn.close()
    await drop_roles(cluster.admin_url, roles=roles)


async def _runnable(url: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations this server can run: those needing an extension it lacks are held back."""
    conn = await asyncpg.connect(url)
    try:
        available = await available_extensions(conn)
    finally:
        await conn.close()
    return [m for m in discover(directory) if m.requires is None or m.requires in available]


async def _schemas(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT nspname FROM pg_namespace")
        return {r["nspname"] for r in rows}
    finally:
        await conn.close()


def test_every_up_migration_has_a_down() -> None:
    for m in discover():
        assert m.down is not None, f"{m.slice}/{m.up.name} has no down migration"


async def test_up_is_idempotent_and_down_reverts(empty_db: tuple[str, RoleNames]) -> None:
    url, roles = empty_db
    first = await migrate_up(url, roles=roles)
    assert [(m.slice, m.version) for m in first] == [
        (m.slice, m.version) for m in await _runnable(url)
    ]
    assert {"task", "audit", "webhook", "mhv_meta"} <= await _schemas(url)
    assert await migrate_up(url, roles=roles) == []
    for slice_name in ("webhook", "audit", "task", "platform"):
        await migrate_down(url, slice_name=slice_name, to_version=0, roles=roles)
    assert not {"task", "audit", "webhook"} & await _schemas(url)
    again = await migrate_up(url, roles=roles)
    assert len(again) == len(first)


async def test_edited_applied_migration_stops_the_run(
    empty_db: tuple[str, RoleNames], tmp_path: Path
) -> None:
    url, roles = empty_db
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy)
    await migrate_up(url, roles=roles, directory=copy)
    target = copy / "task" / "0001_users.up.sql"
    target.write_text(target.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(ConfigurationError, match="changed after it was applied"):
        await migrate_up(url, roles=roles, directory=copy)


async def test_concurrent_runs_take_turns(empty_db: tuple[str, RoleNames]) -> None:
    url, roles = empty_db
    results = await asyncio.gather(*(migrate_up(url, roles=roles) for _ in range(3)))
    applied = sorted(len(r) for r in results)
    assert applied == [0, 0, len(await _runnable(url))]


async def test_tables_are_owned_by_their_slice_role(empty_db: tuple[str, RoleNames]) -> None:
    url, roles = empty_db
    await migrate_up(url, roles=roles)
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT schemaname, tableowner FROM pg_tables WHERE schemaname IN ('task', 'webhook')"
        )
    finally:
        await conn.close()
    assert rows
    for row in rows:
        assert row["tableowner"] == roles.for_slice(row["schemaname"])


async def test_migration_needing_a_missing_extension_is_held_back(
    empty_db: tuple[str, RoleNames], tmp_path: Path
) -> None:
    url, roles = empty_db
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy)
    needy = copy / "task" / "0900_needs_extension.up.sql"
    needy.write_text(
        "-- mhv:requires-extension mhv_no_such_extension\nCREATE TABLE needs_extension (id int);\n"
    )
    (copy / "task" / "0900_needs_extension.down.sql").write_text("DROP TABLE needs_extension;\n")
    (copy / "task" / "0901_after.up.sql").write_text("CREATE TABLE after_needy (id int);\n")
    (copy / "task" / "0901_after.down.sql").write_text("DROP TABLE after_needy;\n")

    done = await migrate_up(url, roles=roles, directory=copy)
    names = [m.name for m in done]
    assert "needs_extension" not in names
    assert "after" in names  # later migrations still run
    assert "needs_extension" in [m.name for m in await held_back(url, directory=copy)]
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT to_regclass('task.needs_extension')") is None
        recorded = await conn.fetchval(
            "SELECT count(*) FROM mhv_meta.schema_migrations WHERE slice = 'task' AND version = 900"
        )
    finally:
        await conn.close()
    assert recorded == 0

    # Once the server offers what it needs (plpgsql stands in: every server has it), the next
    # run applies it.
    needy.write_text("-- mhv:requires-extension plpgsql\nCREATE TABLE needs_extension (id int);\n")
    assert [m.name for m in await migrate_up(url, roles=roles, directory=copy)] == [
        "needs_extension"
    ]
    assert "needs_extension" not in [m.name for m in await held_back(url, directory=copy)]
    assert await migrate_up(url, roles=roles, directory=copy) == []
