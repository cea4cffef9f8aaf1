"""A small migration runner: ordered up/down SQL files per slice, a lock, and checksums.

Layout: ``migrations/<slice>/<NNNN>_<name>.up.sql`` and the matching ``.down.sql``. Slices run
in `SLICES` order. Each file runs in its own transaction as the slice's own role (``SET ROLE``)
so that the role owns what it creates, unless its header says ``-- mhv:run-as admin``.

Applied migrations are recorded in ``mhv_meta.schema_migrations`` with a SHA-256 of the file; a
file changed after it was applied stops the run (MHV-001) instead of silently diverging. A
PostgreSQL advisory lock makes concurrent runs (several replicas starting at once) take turns.

Files are templates: ``{{task_role}}`` and friends become quoted identifiers,
``{{task_role_literal}}`` quoted literals, ``{{database}}`` the current database.

A file whose header says ``-- mhv:requires-extension NAME`` needs a PostgreSQL extension the
server may not offer (pgvector for semantic search). Where ``pg_available_extensions`` has no
such extension the migration is held back: not run, not recorded, listed by `held_back`; the
run goes on with the others, and a later run on a server that gained it applies it.

A down migration that destroys data says so in its header, one line per table it empties or
rows it drops (``-- mhv:loses task.tasks``, ``-- mhv:loses webhook.saga_log WHERE
created_task``, ``-- mhv:loses audit.*`` for every table of a schema). Before reverting
anything, `migrate_down` counts those rows; if any exist it reverts nothing and raises MHV-060,
unless the operator allows the loss. A down migration without such a line claims to keep every
row; tests/cli/test_migrate_data.py holds each one to its claim on a database with rows in
every table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from mhv_common.errors import ConfigurationError, MigrationWouldLoseDataError

ROOT = Path(__file__).resolve().parents[3]
MIGRATIONS_DIR = ROOT / "migrations"
SLICES = ("platform", "task", "audit", "webhook")
SERVICE_SLICES = ("task", "audit", "webhook")
# Arbitrary, fixed: all runners against one database serialise on it.
_LOCK_KEY = 0x6D68765F6D6967  # "mhv_mig"
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")
_RUN_AS_RE = re.compile(r"^--\s*mhv:run-as\s+(\w+)\s*$", re.MULTILINE)
_REQUIRES_RE = re.compile(r"^--\s*mhv:requires-extension\s+(\w+)\s*$", re.MULTILINE)
_LOSES_RE = re.compile(
    r"^--\s*mhv:loses\s+([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*|\*)(?:\s+WHERE\s+(.+?))?\s*$",
    re.MULTILINE,
)


@dataclass(frozen=True, slots=True)
class DataLoss:
    """Rows a down migration destroys, as its header declares them.

    Attributes:
        schema: The schema.
        table: The table, or ``*`` for every table of the schema.
        where: SQL condition selecting the rows lost; None for all of them.
    """

    schema: str
    table: str
    where: str | None = None

    def __str__(self) -> str:
        name = f"{self.schema}.{self.table}"
        return f"{name} WHERE {self.where}" if self.where else name


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned step of a slice."""

    slice: str
    version: int
    name: str
    up: Path
    down: Path | None

    @property
    def checksum(self) -> str:
        """SHA-256 of the up file as written (before substitution)."""
        return hashlib.sha256(self.up.read_bytes()).hexdigest()

    @property
    def requires(self) -> str | None:
        """The extension the up file's header says it needs, if any."""
        match = _REQUIRES_RE.search(self.up.read_text())
        return match.group(1) if match else None

    @property
    def losses(self) -> tuple[DataLoss, ...]:
        """What the down migration declares it destroys (nothing: it keeps every row)."""
        if self.down is None:
            return ()
        return tuple(
            DataLoss(schema, table, where or None)
            for schema, table, where in _LOSES_RE.findall(self.down.read_text())
        )


@dataclass(frozen=True, slots=True)
class RoleNames:
    """Database role names for one deployment."""

    prefix: str = "mhv"

    def for_slice(self, slice_name: str) -> str:
        """The login role that owns `slice_name`."""
        return f"{self.prefix}_{slice_name}"

    def all(self) -> dict[str, str]:
        """Template variable -> role name, for every role a migration may mention."""
        names = {f"{s}_role": self.for_slice(s) for s in SERVICE_SLICES}
        names["audit_owner_role"] = f"{self.prefix}_audit_owner"
        return names


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migrations on disk, in the order they apply."""
    found: list[Migration] = []
    for slice_name in SLICES:
        folder = directory / slice_name
        if not folder.is_dir():
            continue
        ups: dict[int, tuple[str, Path]] = {}
        downs: dict[int, Path] = {}
        for path in sorted(folder.iterdir()):
            match = _FILE_RE.match(path.name)
            if match is None:
                continue
            version = int(match.group(1))
            if match.group(3) == "up":
                if version in ups:
                    raise ConfigurationError(f"{slice_name}: two migrations numbered {version}.")
                ups[version] = (match.group(2), path)
            else:
                downs[version] = path
        for version in sorted(ups):
            name, up = ups[version]
            found.append(Migration(slice_name, version, name, up, downs.get(version)))
    return found


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def render(text: str, *, roles: RoleNames, database: str) -> str:
    """Substitute the template variables of a migration file."""
    variables: dict[str, str] = {"database": _ident(database)}
    for key, role in roles.all().items():
        variables[key] = _ident(role)
        variables[f"{key}_literal"] = _literal(role)

    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in variables:
            raise ConfigurationError(f"Unknown migration variable {{{{{key}}}}}.")
        return variables[key]

    return re.sub(r"\{\{(\w+)\}\}", replace, text)


def _run_as(text: str, slice_name: str, roles: RoleNames) -> str | None:
    match = _RUN_AS_RE.search(text)
    who = match.group(1) if match else slice_name
    if who == "admin" or slice_name == "platform":
        return None
    return roles.for_slice(who)


async def _enter_slice(conn: asyncpg.Connection, slice_name: str, run_as: str | None) -> None:
    # Unqualified names in a slice's files mean that slice's schema.
    if slice_name in SERVICE_SLICES:
        await conn.execute(f"SET LOCAL search_path TO {_ident(slice_name)}")
    if run_as is not None:
        await conn.execute(f"SET LOCAL ROLE {_ident(run_as)}")


_META_DDL = """
CREATE SCHEMA IF NOT EXISTS mhv_meta;
REVOKE ALL ON SCHEMA mhv_meta FROM PUBLIC;
CREATE TABLE IF NOT EXISTS mhv_meta.schema_migrations (
    slice      text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slice, version)
);
"""


async def applied(conn: asyncpg.Connection) -> dict[tuple[str, int], str]:
    """(slice, version) -> checksum of every applied migration."""
    rows = await conn.fetch("SELECT slice, version, checksum FROM mhv_meta.schema_migrations")
    return {(r["slice"], r["version"]): r["checksum"] for r in rows}


async def available_extensions(conn: asyncpg.Connection) -> set[str]:
    """Extensions this server can create (installed or not)."""
    rows = await conn.fetch("SELECT name FROM pg_available_extensions")
    return {r["name"] for r in rows}


def _lacks_extension(m: Migration, available: set[str]) -> bool:
    return m.requires is not None and m.requires not in available


async def held_back(dsn: str, *, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Unapplied migrations that need an extension this server does not offer."""
    conn = await asyncpg.connect(dsn)
    try:
        available = await available_extensions(conn)
        has_history = await conn.fetchval(
            "SELECT to_regclass('mhv_meta.schema_migrations') IS NOT NULL"
        )
        seen = await applied(conn) if has_history else {}
    finally:
        await conn.close()
    return [
        m
        for m in discover(directory)
        if (m.slice, m.version) not in seen and _lacks_extension(m, available)
    ]


@asynccontextmanager
async def _locked(dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """An administrator connection holding the migration lock, and the database name."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(_META_DDL)
            yield conn, await conn.fetchval("SELECT current_database()")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def _run_file(
    conn: asyncpg.Connection,
    m: Migration,
    path: Path,
    *,
    roles: RoleNames,
    database: str,
    record: tuple[str, tuple[object, ...]],
) -> None:
    """Run one migration file and update the history, in one transaction."""
    text = path.read_text()  # noqa: ASYNC240 - a few KiB, once per migration
    run_as = _run_as(text, m.slice, roles)
    async with conn.transaction():
        await _enter_slice(conn, m.slice, run_as)
        await conn.execute(render(text, roles=roles, database=database))
        if run_as is not None:
            await conn.execute("RESET ROLE")
        await conn.execute(record[0], *record[1])


async def migrate_up(
    dsn: str,
    *,
    roles: RoleNames = RoleNames(),
    passwords: dict[str, str] | None = None,
    directory: Path = MIGRATIONS_DIR,
    target: dict[str, int] | None = None,
) -> list[Migration]:
    """Apply every pending migration (up to `target[slice]` where given).

    Args:
        dsn: Administrator URL (may create roles and schemas).
        roles: Role names of this deployment.
        passwords: Slice -> password to set on that slice's login role.
        directory: Where the migration files are.
        target: Highest version to apply per slice.

    Returns:
        The migrations applied by this run.

    Raises:
        ConfigurationError: A migration file changed after it was applied.
    """
    done: list[Migration] = []
    async with _locked(dsn) as (conn, database):
        seen = await applied(conn)
        available = await available_extensions(conn)
        for m in discover(directory):
            if target is not None and m.version > target.get(m.slice, 1 << 30):
                continue
            if (m.slice, m.version) not in seen and _lacks_extension(m, available):
                continue  # held back until the server offers the extension
            recorded = seen.get((m.slice, m.version))
            if recorded is not None:
                if recorded != m.checksum:
                    raise ConfigurationError(
                        f"migrations/{m.slice}/{m.up.name} changed after it was applied; "
                        "add a new migration instead of editing an applied one."
                    )
                continue
            insert = (
                "INSERT INTO mhv_meta.schema_migrations (slice, version, name, checksum)"
                " VALUES ($1, $2, $3, $4)"
            )
            await _run_file(
                conn,
                m,
                m.up,
                roles=roles,
                database=database,
                record=(insert, (m.slice, m.version, m.name, m.checksum)),
            )
            done.append(m)
        for slice_name, password in (passwords or {}).items():
            await conn.execute(
                f"ALTER ROLE {_ident(roles.for_slice(slice_name))} PASSWORD {_literal(password)}"
            )
    return done


async def rows_lost(conn: asyncpg.Connection, loss: DataLoss) -> int:
    """How many rows `loss` would destroy now (tables that do not exist hold none)."""
    if loss.table == "*":
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
            loss.schema,
        )
        names = [r["tablename"] for r in tables]
    elif await conn.fetchval("SELECT to_regclass($1)", f"{loss.schema}.{loss.table}"):
        names = [loss.table]
    else:
        names = []
    total = 0
    for name in names:
        where = f" WHERE {loss.where}" if loss.where else ""
        # Names come from the header's pattern (identifiers only) or the catalog; the condition
        # is SQL written in a migration file, as trusted as the migration itself.
        total += await conn.fetchval(
            f"SELECT count(*) FROM {_ident(loss.schema)}.{_ident(name)}{where}"  # noqa: S608  # nosec B608: identifiers from the migration's own list, quoted
        )
    return total


async def migrate_down(
    dsn: str,
    *,
    slice_name: str,
    to_version: int,
    roles: RoleNames = RoleNames(),
    directory: Path = MIGRATIONS_DIR,
    allow_data_loss: bool = False,
) -> list[Migration]:
    """Revert `slice_name` to `to_version` (0 = nothing applied), newest first.

    Raises:
        MigrationWouldLoseDataError: A migration to revert declares losses and the rows exist;
            nothing was reverted (unless `allow_data_loss`).
        ConfigurationError: A migration to revert has no down file.
    """
    undone: list[Migration] = []
    async with _locked(dsn) as (conn, database):
        seen = await applied(conn)
        mine = [m for m in discover(directory) if m.slice == slice_name]
        steps = [
            m
            for m in sorted(mine, key=lambda m: m.version, reverse=True)
            if m.version > to_version and (m.slice, m.version) in seen
        ]
        for m in steps:
            if m.down is None:
                raise ConfigurationError(f"migrations/{m.slice}/{m.up.name} has no down migration.")
        at_risk = [
            (m, loss, count)
            for m in steps
            for loss in m.losses
            if (count := await rows_lost(conn, loss))
        ]
        if at_risk and not allow_data_loss:
            lost = "; ".join(
                f"{m.slice}/{m.down.name if m.down else m.up.name} drops {count} row(s) of {loss}"
                for m, loss, count in at_risk
            )
            raise MigrationWouldLoseDataError(f"Nothing was reverted: {lost}.")
        for m in steps:
            assert m.down is not None
            delete = "DELETE FROM mhv_meta.schema_migrations WHERE slice = $1 AND version = $2"
            await _run_file(
                conn,
                m,
                m.down,
                roles=roles,
                database=database,
                record=(delete, (m.slice, m.version)),
            )
            undone.append(m)
    return undone


async def drop_roles(dsn: str, *, roles: RoleNames = RoleNames()) -> None:
    """Drop this deployment's roles (after every database using them was dropped or reverted)."""
    conn = await asyncpg.connect(dsn)
    try:
        for role in roles.all().values():
            await conn.execute(f"DROP ROLE IF EXISTS {_ident(role)}")
    finally:
        await conn.close()
