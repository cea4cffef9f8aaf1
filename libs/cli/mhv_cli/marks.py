"""Count marks: what the database held at a point a restore can stop at exactly.

After each base backup, `take_mark` locks every table of the service schemas against writes
(``SHARE`` mode, waiting at most `LOCK_TIMEOUT_MS` for each and retrying, so it never joins a
deadlock), counts their rows, reads the audit chain head, and writes a named restore point into
the WAL (``pg_create_restore_point``) before releasing the locks. No write can fall between the
counts and the restore point, so a restore to that name (`recovery_target_name`) must give
exactly these counts: that is what `mhv_cli.verify` compares. Writers wait for the length of
the counting (a few hundred milliseconds at a million tasks), never fail.

Marks are JSON files in the repository's ``marks/`` folder, one per backup.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import asyncpg

SCHEMAS = ("task", "audit", "webhook")
LOCK_TIMEOUT_MS = 200
LOCK_ATTEMPTS = 50


@dataclass(frozen=True, slots=True)
class Mark:
    """What the database held at a named restore point.

    Attributes:
        backup_id: The backup the mark follows.
        restore_point: Name of the restore point in the WAL.
        taken_at: When (database clock).
        lsn: WAL position of the restore point.
        counts: ``schema.table`` -> rows.
        audit_head_id: Last id of the audit chain.
        audit_head_hash: Its hash, hex.
    """

    backup_id: str
    restore_point: str
    taken_at: str
    lsn: str
    counts: dict[str, int]
    audit_head_id: int
    audit_head_hash: str

    def save(self, folder: Path) -> Path:
        """Write the mark as ``<backup_id>.json`` in `folder`."""
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{self.backup_id}.json"
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path, backup_id: str) -> Mark | None:
        """The mark of `backup_id`, if one was taken."""
        path = folder / f"{backup_id}.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def restore_point_name(backup_id: str) -> str:
    """The restore point written after backup `backup_id`."""
    return f"mhv-mark-{backup_id}"


async def tables(conn: asyncpg.Connection) -> list[str]:
    """``schema.table`` of every table of the service schemas, in a fixed order."""
    rows = await conn.fetch(
        "SELECT schemaname || '.' || tablename AS name FROM pg_tables"
        " WHERE schemaname = ANY($1::text[]) ORDER BY 1",
        list(SCHEMAS),
    )
    return [r["name"] for r in rows]


def _quoted(name: str) -> str:
    schema, table = name.split(".", 1)
    return f'"{schema}"."{table}"'


async def count_rows(conn: asyncpg.Connection, names: list[str]) -> dict[str, int]:
    """Exact row counts of `names`."""
    counts = {}
    for name in names:
        counts[name] = int(await conn.fetchval(f"SELECT count(*) FROM {_quoted(name)}"))  # noqa: S608  # nosec B608: a table name of our own schema, quoted
    return counts


async def audit_head(conn: asyncpg.Connection) -> tuple[int, str]:
    """The audit chain head (0 and zeros before the first event, or without the schema)."""
    if not await conn.fetchval("SELECT to_regclass('audit.chain_head') IS NOT NULL"):
        return 0, "00" * 32
    row = await conn.fetchrow("SELECT last_id, encode(last_hash, 'hex') AS h FROM audit.chain_head")
    return (int(row["last_id"]), str(row["h"])) if row else (0, "00" * 32)


async def take_mark(url: str, backup_id: str) -> Mark:
    """Count every table under write locks and write the restore point (module docstring)."""
    conn = await asyncpg.connect(url)
    try:
        names = await tables(conn)
        for attempt in range(LOCK_ATTEMPTS):
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                    if names:
                        await conn.execute(
                            f"LOCK TABLE {', '.join(_quoted(n) for n in names)} IN SHARE MODE"
                        )
                    counts = await count_rows(conn, names)
                    head_id, head_hash = await audit_head(conn)
                    point = restore_point_name(backup_id)
                    row = await conn.fetchrow(
                        "SELECT pg_create_restore_point($1)::text AS lsn, now() AS at", point
                    )
                    assert row is not None
                    taken: dt.datetime = row["at"]
                    return Mark(
                        backup_id=backup_id,
                        restore_point=point,
                        taken_at=taken.isoformat(),
                        lsn=str(row["lsn"]),
                        counts=counts,
                        audit_head_id=head_id,
                        audit_head_hash=head_hash,
                    )
            except asyncpg.LockNotAvailableError:
                # Writers hold a table: let them finish, and try again.
                await asyncio.sleep(min(0.05 * (attempt + 1), 1.0))
        raise TimeoutError(f"could not lock the tables for a count mark in {LOCK_ATTEMPTS} tries")
    finally:
        await conn.close()
