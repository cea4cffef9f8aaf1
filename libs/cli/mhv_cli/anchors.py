"""Audit chain anchors: the chain head, recorded outside the database.

A superuser who rewrites the audit log from some row to its end, recomputing every hash, leaves
a chain that verifies (docs/security/audit-logging.md). What exposes it is a head recorded
earlier somewhere the database's administrators cannot write: the row at that id must still
carry that hash. `record` verifies the whole chain with the audit service's own verifier and
appends ``{recorded_at, head_id, head_hash}`` as one JSON line to the anchors file
(``MHV_AUDIT_ANCHORS_FILE``, by default ``audit-anchors.jsonl`` in the state folder; in
production a write-once location). `compare` checks a database against every anchor.

``mhv audit anchor`` records one; ``mhv audit verify`` verifies a database and compares it with
the anchors. `mhv backup run` records one with every backup.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from mhv_common.errors import AuditChainBrokenError

if TYPE_CHECKING:
    from mhv_audit import Verification


def default_file() -> Path:
    """``MHV_AUDIT_ANCHORS_FILE``, else ``audit-anchors.jsonl`` in the state folder."""
    given = os.environ.get("MHV_AUDIT_ANCHORS_FILE")
    if given:
        return Path(given)
    from mhv_cli import devstate

    return devstate.home() / "audit-anchors.jsonl"


@dataclass(frozen=True, slots=True)
class Anchor:
    """One recorded chain head.

    Attributes:
        recorded_at: When it was recorded (UTC, ISO 8601).
        head_id: Id of the last row of the chain then.
        head_hash: That row's hash, hex.
    """

    recorded_at: str
    head_id: int
    head_hash: str

    @property
    def when(self) -> dt.datetime:
        """`recorded_at` as a datetime."""
        return dt.datetime.fromisoformat(self.recorded_at)


def load(path: Path) -> list[Anchor]:
    """Every anchor in the file, oldest first (none if it does not exist)."""
    if not path.exists():
        return []
    anchors = []
    for line in path.read_text().splitlines():
        if line.strip():
            anchors.append(Anchor(**json.loads(line)))
    return anchors


def append(path: Path, anchor: Anchor) -> None:
    """Append `anchor` durably (one line, fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(asdict(anchor), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _audit_dsn(url: str) -> str:
    """`url` with the audit schema first on the search path, as the audit role has it."""
    parts = urlsplit(url)
    query = "&".join(p for p in (parts.query, "search_path=audit") if p)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


async def verify_chain(url: str) -> Verification:
    """Verify the whole audit chain of the database at `url` with the audit service's verifier.

    `url` is an administrator's (or the audit role's) URL of the application database.
    """
    # Imported here: every `mhv` command would otherwise load the audit service (and gRPC).
    from mhv_audit import AuditLog, AuditStore
    from mhv_common.db import Database

    db = Database(_audit_dsn(url), name="audit-verify", min_size=1, max_size=2)
    await db.open()
    try:
        return await AuditLog(AuditStore(db)).verify()
    finally:
        await db.close()


async def record(url: str, path: Path) -> Anchor:
    """Verify the chain and append its head to `path`.

    Raises:
        AuditChainBrokenError: The chain does not verify: no anchor is recorded (MHV-400).
    """
    result = await verify_chain(url)
    if not result.ok:
        brk = result.first_break
        raise AuditChainBrokenError(
            f"The audit chain is broken at row {brk.row_id if brk else '?'}"
            f" ({brk.kind.value if brk else '?'}); no anchor recorded."
        )
    anchor = Anchor(
        recorded_at=dt.datetime.now(dt.UTC).isoformat(),
        head_id=result.head_id,
        head_hash=result.head_hash.hex(),
    )
    append(path, anchor)
    return anchor


@dataclass(frozen=True, slots=True)
class Comparison:
    """How a database's chain compares with the anchors.

    Attributes:
        checked: Anchors whose row exists in the database (and so were compared).
        mismatched: Anchors whose row carries another hash: history was rewritten.
        missing: Anchors recorded before `complete_at` whose row is absent: rows were lost.
        later: Anchors past the database's head recorded after `complete_at` (expected for a
            restore to an earlier point).
    """

    checked: int
    mismatched: list[Anchor]
    missing: list[Anchor]
    later: int

    @property
    def ok(self) -> bool:
        """No anchor contradicts the database."""
        return not self.mismatched and not self.missing


async def compare(
    conn: asyncpg.Connection,
    anchors: Sequence[Anchor],
    *,
    complete_at: dt.datetime | None = None,
) -> Comparison:
    """Compare the chain in `conn`'s database with `anchors`.

    Args:
        conn: An administrator connection to the application database.
        anchors: The anchors to compare with.
        complete_at: The database holds everything committed before this moment (a restore
            point's time); anchors recorded earlier must all be present. None: now.
    """
    head = int(await conn.fetchval("SELECT last_id FROM audit.chain_head"))
    ids = sorted({a.head_id for a in anchors if 0 < a.head_id <= head})
    rows = await conn.fetch(
        "SELECT id, encode(hash, 'hex') AS h FROM audit.task_audit_log WHERE id = ANY($1)", ids
    )
    stored = {int(r["id"]): str(r["h"]) for r in rows}
    cutoff = complete_at or dt.datetime.now(dt.UTC)
    mismatched, missing, later, checked = [], [], 0, 0
    for anchor in anchors:
        if anchor.head_id == 0:
            continue
        if anchor.head_id <= head:
            checked += 1
            if stored.get(anchor.head_id) != anchor.head_hash:
                mismatched.append(anchor)
        elif anchor.when <= cutoff:
            missing.append(anchor)
        else:
            later += 1
    return Comparison(checked, mismatched, missing, later)


# --- mhv audit ----------------------------------------------------------------------------


async def _anchor(args: argparse.Namespace) -> int:
    from mhv_cli.main import admin_url

    path = Path(args.file) if args.file else default_file()
    anchor = await record(args.database_url or admin_url(), path)
    print(f"anchor recorded in {path}: head {anchor.head_id} {anchor.head_hash}")
    return 0


async def _verify(args: argparse.Namespace) -> int:
    from mhv_cli.main import admin_url

    url = args.database_url or admin_url()
    path = Path(args.file) if args.file else default_file()
    result = await verify_chain(url)
    conn = await asyncpg.connect(url)
    try:
        comparison = await compare(conn, load(path))
    finally:
        await conn.close()
    report: dict[str, Any] = {
        "ok": result.ok and comparison.ok,
        "rows_checked": result.rows_checked,
        "head_id": result.head_id,
        "head_hash": result.head_hash.hex(),
        "first_break": (
            {
                "row_id": result.first_break.row_id,
                "kind": result.first_break.kind.value,
                "detail": result.first_break.detail,
            }
            if result.first_break
            else None
        ),
        "anchors_file": str(path),
        "anchors_checked": comparison.checked,
        "anchors_mismatched": [asdict(a) for a in comparison.mismatched],
        "anchors_missing": [asdict(a) for a in comparison.missing],
    }
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        print(
            f"error: [{AuditChainBrokenError.code}] the audit chain does not verify or "
            "contradicts an anchor; follow docs/runbooks/audit-chain-broken.md",
            file=sys.stderr,
        )
        return 1
    return 0


def add_commands(sub: Any) -> None:
    """Register ``audit anchor`` and ``audit verify`` on the ``mhv`` subcommand parser."""
    audit = sub.add_parser("audit", help="audit chain: verify it, record anchors")
    actions = audit.add_subparsers(dest="action", required=True)
    anchor = actions.add_parser("anchor", help="verify the chain and record its head")
    check = actions.add_parser("verify", help="verify the chain and compare it with the anchors")
    for parser, handler in ((anchor, _anchor), (check, _verify)):
        parser.add_argument("--database-url", help="administrator URL (default: MHV_DATABASE_URL)")
        parser.add_argument("--file", help="anchors file (default: MHV_AUDIT_ANCHORS_FILE)")
        parser.set_defaults(func=lambda a, h=handler: asyncio.run(h(a)))
