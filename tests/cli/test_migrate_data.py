"""Every migration up -> down -> up on a database holding rows in every table.

A down migration either keeps every row (no ``-- mhv:loses`` line in its header) or declares
what it destroys. Here each one is held to that: on a copy of a seeded database, revert it,
apply everything again, and compare every table with the seed, row by row; only rows a reverted
file declared lost may be missing or changed. Where declared losses have rows, the first attempt
must be refused (MHV-060) with nothing reverted. The `mhv migrate` command itself runs the same
way from the command line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mhv_cli.migrate import (
    SLICES,
    DataLoss,
    Migration,
    RoleNames,
    discover,
    held_back,
    migrate_down,
    migrate_up,
    rows_lost,
)
from mhv_common.errors import MigrationWouldLoseDataError
from tests.harness import Cluster, with_database
from tests.seed import SERVICE_SCHEMAS, empty_tables, scratch_database

Snapshot = dict[str, dict[str, str]]


@dataclass
class Seeded:
    """A migrated, seeded template database and its roles."""

    cluster: Cluster
    template: str
    roles: RoleNames
    snapshot: Snapshot

    def url(self, database: str) -> str:
        return with_database(self.cluster.admin_url, database)


async def _admin(cluster: Cluster, sql: str) -> None:
    conn = await asyncpg.connect(cluster.admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def snapshot(url: str) -> Snapshot:
    """Every row of every service table as JSON, keyed by its primary key."""
    conn = await asyncpg.connect(url)
    try:
        tables = await conn.fetch(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY($1::text[])",
            list(SERVICE_SCHEMAS),
        )
        result: Snapshot = {}
        for t in tables:
            name = f"{t['schemaname']}.{t['tablename']}"
            key = await _key_expression(conn, name)
            rows = await conn.fetch(
                f"SELECT ({key})::text AS k, to_jsonb(x)::text AS v FROM {name} x"
            )
            result[name] = {r["k"]: r["v"] for r in rows}
        return result
    finally:
        await conn.close()


async def _key_expression(conn: asyncpg.Connection, table: str) -> str:
    columns = await conn.fetch(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
        " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1::regclass AND i.indisprimary"
        " ORDER BY a.attnum",
        table,
    )
    if not columns:
        return "to_jsonb(x)"
    return "jsonb_build_array(" + ", ".join(f"x.{c['attname']}" for c in columns) + ")"


async def lost_keys(url: str, losses: list[DataLoss]) -> dict[str, set[str] | None]:
    """Table -> keys of the rows `losses` select (None: every row of the table)."""
    conn = await asyncpg.connect(url)
    try:
        keys: dict[str, set[str] | None] = {}
        for loss in losses:
            if loss.table == "*":
                for t in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1", loss.schema
                ):
                    keys[f"{loss.schema}.{t['tablename']}"] = None
                continue
            name = f"{loss.schema}.{loss.table}"
            if loss.where is None:
                keys[name] = None
                continue
            key = await _key_expression(conn, name)
            rows = await conn.fetch(f"SELECT ({key})::text AS k FROM {name} x WHERE {loss.where}")
            if keys.get(name, set()) is not None:
                keys[name] = (keys.get(name) or set()) | {r["k"] for r in rows}
        return keys
    finally:
        await conn.close()


def reverted_by(m: Migration) -> list[tuple[str, int]]:
    """(slice, to_version) runs that take `m` down: platform takes every slice with it."""
    if m.slice == "platform":
        return [(s, 0) for s in reversed(SLICES)]
    return [(m.slice, m.version - 1)]


def steps_of(m: Migration, applied: set[tuple[str, int]]) -> list[Migration]:
    runs = reverted_by(m)
    return [
        other
        for other in discover()
        if (other.slice, other.version) in applied
        and any(other.slice == s and other.version > v for s, v in runs)
    ]


@pytest.fixture(scope="module")
async def seeded(cluster: Cluster) -> AsyncIterator[Seeded]:
    async with scratch_database(cluster.admin_url, "mhvseed", seed=True) as (url, roles):
        conn = await asyncpg.connect(url)
        try:
            empty = await empty_tables(conn)
        finally:
            await conn.close()
        assert not empty, f"tables with no seed rows (add some to tests/seed.py): {empty}"
        template = url.rsplit("/", 1)[1]
        yield Seeded(cluster, template, roles, await snapshot(url))


@pytest.fixture
async def copy(seeded: Seeded) -> AsyncIterator[str]:
    name = f"{seeded.template}_{secrets.token_hex(3)}"
    await _admin(seeded.cluster, f'CREATE DATABASE "{name}" TEMPLATE "{seeded.template}"')
    yield seeded.url(name)
    await _admin(seeded.cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _label(m: Migration) -> str:
    return f"{m.slice}/{m.version:04d}_{m.name}"


@pytest.mark.parametrize("migration", discover(), ids=_label)
async def test_down_keeps_what_it_claims_and_up_again_works(
    migration: Migration, seeded: Seeded, copy: str
) -> None:
    conn = await asyncpg.connect(copy)
    try:
        history = await conn.fetch("SELECT * FROM mhv_meta.schema_migrations ORDER BY 1, 2")
        applied = {(r["slice"], r["version"]) for r in history}
        if (migration.slice, migration.version) not in applied:
            # A migration needing an extension this server does not offer (pgvector on
            # Debian's PostgreSQL) is held back, never half-applied; it is tested where the
            # server offers it (MHV_TEST_PRIVATE_POSTGRES=1: the private build has pgvector).
            assert migration.requires is not None
            assert migration in await held_back(copy)
            return
        steps = steps_of(migration, applied)
        losses = [loss for step in steps for loss in step.losses]
        at_risk = {str(loss): await rows_lost(conn, loss) for loss in losses}
    finally:
        await conn.close()
    # Every declared loss selects seeded rows, so every refusal below is exercised.
    assert all(at_risk.values()), f"declared losses with no seeded row: {at_risk}"
    excluded = await lost_keys(copy, losses)

    if losses:
        for slice_name, version in reverted_by(migration)[:1]:
            with pytest.raises(MigrationWouldLoseDataError) as refused:
                await migrate_down(
                    copy, slice_name=slice_name, to_version=version, roles=seeded.roles
                )
            for step in steps:
                if step.slice == slice_name:
                    for loss in step.losses:
                        assert str(loss) in refused.value.message
        assert await snapshot(copy) == seeded.snapshot, "a refused down migration changed data"
        conn = await asyncpg.connect(copy)
        try:
            assert await conn.fetch("SELECT * FROM mhv_meta.schema_migrations ORDER BY 1, 2") == (
                history
            )
        finally:
            await conn.close()

    undone = []
    for slice_name, version in reverted_by(migration):
        undone += await migrate_down(
            copy,
            slice_name=slice_name,
            to_version=version,
            roles=seeded.roles,
            allow_data_loss=bool(losses),
        )
    assert {_label(m) for m in undone} == {_label(m) for m in steps}
    redone = await migrate_up(copy, roles=seeded.roles)
    assert {_label(m) for m in redone} == {_label(m) for m in steps}

    after = await snapshot(copy)
    assert set(after) == set(seeded.snapshot), "the same tables exist again"
    for table, rows in seeded.snapshot.items():
        lost = excluded.get(table, set())
        if lost is None:
            continue
        kept = {k: v for k, v in rows.items() if k not in lost}
        survived = {k: after[table][k] for k in kept if k in after[table]}
        assert survived == kept, f"{_label(migration)} down lost or changed rows of {table}"


def _mhv(url: str, roles: RoleNames, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
    env.update(MHV_DATABASE_URL=url, MHV_DB_ROLE_PREFIX=roles.prefix)
    return subprocess.run(
        [str(Path(sys.executable).with_name("mhv")), "migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_mhv_migrate_from_the_command_line(seeded: Seeded, copy: str) -> None:
    up = _mhv(copy, seeded.roles)
    assert up.returncode == 0, up.stderr
    # Nothing to apply; migrations needing an extension this server lacks are listed as held
    # back instead.
    lines = up.stdout.splitlines()
    assert lines == ["database is up to date"] or all(
        line.startswith("held back ") for line in lines
    )
    assert not any(line.startswith("applied ") for line in lines)

    # Reverting the issue claims would drop an unfinished claim: refused, nothing reverted.
    refused = _mhv(copy, seeded.roles, "--down", "webhook", "--to", "2")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: [MHV-060] Nothing was reverted:")
    assert "webhook.issue_links WHERE task_id IS NULL" in refused.stderr
    assert "--allow-data-loss" in refused.stderr
    assert await snapshot(copy) == seeded.snapshot

    allowed = _mhv(copy, seeded.roles, "--down", "webhook", "--to", "2", "--allow-data-loss")
    assert allowed.returncode == 0, allowed.stderr
    # Later migrations go down first, newest first; 0003 is the last one reverted.
    reverted = allowed.stdout.splitlines()
    assert reverted[-1] == "reverted webhook/0003_issue_claims"
    assert all(line.startswith("reverted webhook/") for line in reverted)
    assert reverted == sorted(reverted, reverse=True)
    again = _mhv(copy, seeded.roles)
    assert again.returncode == 0, again.stderr
    assert [x for x in again.stdout.splitlines() if not x.startswith("held back ")] == [
        line.replace("reverted", "applied") for line in reversed(reverted)
    ]
