"""Backup verification: restore the latest backup into a scratch cluster and check it.

``scripts/verify-backups.py`` (and ``mhv backup verify``) runs `verify_latest`:

1. restores the newest backup into a new cluster on a free port, up to the count mark taken
   right after it (`mhv_cli.marks`), so that the restore holds exactly what the source held then;
2. ``page_checksums``: with the cluster cleanly stopped, ``pg_checksums --check`` reads every
   page of every relation and compares its checksum;
3. ``indexes``: ``pg_amcheck`` checks every B-tree index of the application database against
   its table (``--heapallindexed --rootdescend``) and every table's heap;
4. ``row_counts``: every table of the task, audit and webhook schemas against the mark;
5. ``foreign_keys``: every foreign key of those schemas holds, row by row;
6. ``audit_chain``: the audit service's own verifier over the whole chain, whose head must be
   the mark's;
7. ``anchors``: the chain agrees with every anchor recorded outside the database
   (`mhv_cli.anchors`), and holds every row anchored before the mark;
8. ``outbox_audit``: every outbox event marked delivered is in the audit log.

It prints one JSON report and exits non-zero when any check failed. Each run's report is kept
in the repository's ``verification/`` folder, which the backup exporter turns into metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from mhv_cli import anchors
from mhv_cli.backup import Repository
from mhv_cli.marks import Mark, count_rows, tables
from mhv_cli.pgcluster import PrivateCluster, free_port
from mhv_cli.restore import restore
from mhv_common.errors import BackupVerificationFailedError, MahavishnuError

LAST_REPORT = "last.json"
LAST_SUCCESS = "last-success.json"


@dataclass
class Check:
    """One check of the report."""

    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """What a verification found."""

    backup_id: str = ""
    restore_point: str = ""
    started_at: str = ""
    finished_at: str = ""
    restore_seconds: float = 0.0
    restored_bytes: int = 0
    total_seconds: float = 0.0
    checks: dict[str, Check] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Every check passed and nothing failed on the way."""
        return not self.error and bool(self.checks) and all(c.ok for c in self.checks.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "ok": self.ok,
            "backup_id": self.backup_id,
            "restore_point": self.restore_point,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "restore_seconds": round(self.restore_seconds, 3),
            "restored_bytes": self.restored_bytes,
            "total_seconds": round(self.total_seconds, 3),
            "checks": {name: {"ok": c.ok, **c.detail} for name, c in self.checks.items()},
            "error": self.error,
        }


async def _wait_promoted(url: str, *, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            conn = await asyncpg.connect(url, timeout=5)
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    return
            finally:
                await conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError("the restored cluster did not finish recovery")
        await asyncio.sleep(0.2)


def check_page_checksums(cluster: PrivateCluster) -> Check:
    """``pg_checksums --check`` over the (stopped) cluster's every page."""
    data_dir = cluster.data_dir
    control = subprocess.run(
        [str(cluster.binary("pg_controldata")), "-D", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    enabled = "Data page checksum version:           1" in control.stdout
    if not enabled:
        return Check(False, {"reason": "data checksums are off in this cluster (initdb -k)"})
    result = subprocess.run(
        [str(cluster.binary("pg_checksums")), "--check", "-D", str(data_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    scanned = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Files scanned", "Blocks scanned", "Bad checksums"):
            scanned[key.strip().lower().replace(" ", "_")] = int(value.strip())
    ok = result.returncode == 0 and scanned.get("bad_checksums", 1) == 0
    detail: dict[str, Any] = dict(scanned)
    if not ok:
        detail["output"] = (result.stdout + result.stderr).strip().splitlines()[-10:]
    return Check(ok, detail)


async def check_indexes(cluster: PrivateCluster, database: str, password: str) -> Check:
    """``pg_amcheck`` on every B-tree index and heap of `database`."""
    conn = await asyncpg.connect(cluster.url(database))
    try:
        indexes = await conn.fetch(
            "SELECT n.nspname || '.' || c.relname AS name, am.amname AS am FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_am am ON am.oid = c.relam"
            " WHERE n.nspname = ANY($1::text[]) ORDER BY 1",
            ["task", "audit", "webhook"],
        )
    finally:
        await conn.close()
    env = dict(os.environ, PGPASSWORD=password)
    result = await asyncio.to_thread(
        subprocess.run,
        [
            str(cluster.binary("pg_amcheck")),
            "--host=127.0.0.1",
            f"--port={cluster.port}",
            "--username=postgres",
            f"--database={database}",
            "--install-missing",
            "--heapallindexed",
            "--rootdescend",
            "--no-strict-names",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    btree = [r["name"] for r in indexes if r["am"] == "btree"]
    other = [f"{r['name']} ({r['am']})" for r in indexes if r["am"] != "btree"]
    detail: dict[str, Any] = {"btree_indexes_checked": len(btree)}
    if other:
        # amcheck learns GIN in PostgreSQL 18; pg_checksums above still read their pages.
        detail["not_checkable_by_amcheck"] = other
    ok = result.returncode == 0
    output = (result.stdout + result.stderr).strip()
    if 'extension "amcheck" is not available' in output:
        detail["reason"] = (
            "this PostgreSQL installation has no amcheck module (the pip-installed build ships "
            "no contrib modules; PostgreSQL's packages do: postgresql-contrib)"
        )
    elif not ok:
        detail["corruption"] = output.splitlines()[-20:]
    return Check(ok, detail)


async def check_row_counts(conn: asyncpg.Connection, mark: Mark | None) -> Check:
    """Every table's rows against the count mark."""
    counts = await count_rows(conn, await tables(conn))
    if mark is None:
        return Check(False, {"reason": "no count mark for this backup", "counts": counts})
    differ = {
        name: {"expected": mark.counts.get(name), "restored": counts.get(name)}
        for name in sorted(set(counts) | set(mark.counts))
        if counts.get(name) != mark.counts.get(name)
    }
    detail: dict[str, Any] = {"tables": len(counts), "rows": sum(counts.values())}
    if differ:
        detail["mismatches"] = differ
    return Check(not differ, detail)


_FOREIGN_KEYS = """
SELECT c.conname, c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent,
       array_agg(a.attname ORDER BY k.ord) AS child_columns,
       array_agg(p.attname ORDER BY k.ord) AS parent_columns
FROM pg_constraint c
JOIN pg_namespace n ON n.oid = c.connamespace
CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(child_att, parent_att, ord)
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.child_att
JOIN pg_attribute p ON p.attrelid = c.confrelid AND p.attnum = k.parent_att
WHERE c.contype = 'f' AND n.nspname = ANY($1::text[])
GROUP BY c.conname, c.conrelid, c.confrelid
ORDER BY 1
"""


async def check_foreign_keys(conn: asyncpg.Connection) -> Check:
    """Every foreign key of the service schemas, row by row."""
    violations = {}
    keys = await conn.fetch(_FOREIGN_KEYS, ["task", "audit", "webhook"])
    for key in keys:
        child_cols = [f'x."{c}"' for c in key["child_columns"]]
        match = " AND ".join(
            f'y."{p}" = {c}' for p, c in zip(key["parent_columns"], child_cols, strict=True)
        )
        present = " AND ".join(f"{c} IS NOT NULL" for c in child_cols)
        orphans = await conn.fetchval(
            f"SELECT count(*) FROM {key['child']} x WHERE {present}"  # noqa: S608  # nosec B608: names from the schema's own foreign keys
            f" AND NOT EXISTS (SELECT 1 FROM {key['parent']} y WHERE {match})"
        )
        if orphans:
            violations[key["conname"]] = int(orphans)
    detail: dict[str, Any] = {"foreign_keys": len(keys)}
    if violations:
        detail["orphan_rows"] = violations
    return Check(not violations, detail)


async def check_audit_chain(url: str, mark: Mark | None) -> Check:
    """The audit service's verifier over the whole chain; the head must be the mark's."""
    result = await anchors.verify_chain(url)
    detail: dict[str, Any] = {"rows_checked": result.rows_checked, "head_id": result.head_id}
    ok = result.ok
    if result.first_break is not None:
        detail["first_break"] = {
            "row_id": result.first_break.row_id,
            "kind": result.first_break.kind.value,
            "detail": result.first_break.detail,
        }
    if mark is not None and (
        result.head_id != mark.audit_head_id or result.head_hash.hex() != mark.audit_head_hash
    ):
        ok = False
        detail["expected_head_id"] = mark.audit_head_id
    return Check(ok, detail)


async def check_anchors(conn: asyncpg.Connection, path: Path, mark: Mark | None) -> Check:
    """The chain against every anchor recorded outside the database."""
    recorded = anchors.load(path)
    if not recorded:
        return Check(
            False,
            {"reason": f"no anchors recorded in {path} (`mhv audit anchor`, `mhv backup run`)"},
        )
    cutoff = dt.datetime.fromisoformat(mark.taken_at) if mark else None
    comparison = await anchors.compare(conn, recorded, complete_at=cutoff)
    detail: dict[str, Any] = {
        "file": str(path),
        "compared": comparison.checked,
        "after_restore_point": comparison.later,
    }
    if comparison.mismatched:
        detail["mismatched"] = [a.head_id for a in comparison.mismatched]
    if comparison.missing:
        detail["missing_rows_anchored_at"] = [a.head_id for a in comparison.missing]
    return Check(comparison.ok and comparison.checked > 0, detail)


# Every outbox that feeds the audit log: the task service's and the webhook gateway's.
OUTBOXES = ("task.outbox", "webhook.outbox")
_OUTBOX_COUNTS = (
    "SELECT count(*) FILTER (WHERE o.delivered_at IS NOT NULL) AS delivered,"
    " count(*) FILTER (WHERE o.delivered_at IS NULL) AS pending,"
    " count(*) FILTER (WHERE o.delivered_at IS NOT NULL AND NOT EXISTS ("
    "   SELECT 1 FROM audit.task_audit_log a WHERE a.event_id = o.event_id)) AS lost"
)


async def check_outbox_audit(conn: asyncpg.Connection) -> Check:
    """Every outbox event marked delivered is in the audit log (in every outbox restored)."""
    detail = {"delivered": 0, "pending": 0, "lost": 0}
    for outbox in OUTBOXES:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", outbox):
            continue  # a backup taken before this outbox existed
        sql = f"{_OUTBOX_COUNTS} FROM {outbox} o"  # nosec B608: one of OUTBOXES
        row = await conn.fetchrow(sql)
        assert row is not None
        for key in detail:
            detail[key] += int(row[key])
    return Check(detail["lost"] == 0, detail)


async def verify_latest(
    repo: Repository,
    *,
    anchors_file: Path | None = None,
    scratch: Path | None = None,
    out: Any = None,
) -> Report:
    """Restore the newest backup into a scratch cluster and run every check on it."""
    report = Report(started_at=dt.datetime.now(dt.UTC).isoformat())
    started = time.monotonic()
    root = scratch or Path(tempfile.mkdtemp(prefix="mhv-verify-"))
    cluster = PrivateCluster(root, free_port(), settings={"synchronous_standby_names": ""})
    try:
        cluster.bin_dir = repo.bin_dir()
        backup = repo.latest()
        primary = repo.primary()
        mark = Mark.load(repo.marks_dir, backup.backup_id)
        report.backup_id = backup.backup_id
        report.restore_point = mark.restore_point if mark else "latest"
        restored = await asyncio.to_thread(
            restore,
            repo,
            cluster.data_dir,
            target_name=mark.restore_point if mark else None,
            backup_id=backup.backup_id,
            out=out,
        )
        report.restore_seconds = restored.seconds
        report.restored_bytes = restored.bytes
        (root / "superuser.password").write_text(primary.password + "\n")
        await asyncio.to_thread(cluster.start, timeout=600)
        await _wait_promoted(cluster.url())
        # pg_checksums reads a cleanly stopped cluster only.
        await asyncio.to_thread(cluster.stop)
        report.checks["page_checksums"] = await asyncio.to_thread(check_page_checksums, cluster)
        await asyncio.to_thread(cluster.start, timeout=600)
        url = cluster.url(primary.dbname)
        report.checks["indexes"] = await check_indexes(cluster, primary.dbname, primary.password)
        conn = await asyncpg.connect(url)
        try:
            report.checks["row_counts"] = await check_row_counts(conn, mark)
            report.checks["foreign_keys"] = await check_foreign_keys(conn)
            report.checks["audit_chain"] = await check_audit_chain(url, mark)
            report.checks["anchors"] = await check_anchors(
                conn, anchors_file or anchors.default_file(), mark
            )
            report.checks["outbox_audit"] = await check_outbox_audit(conn)
        finally:
            await conn.close()
    except MahavishnuError as exc:
        report.error = f"[{exc.code}] {exc.message}"
    except (OSError, asyncpg.PostgresError, TimeoutError, subprocess.SubprocessError) as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cluster.stop, mode="immediate")
        if scratch is None:
            shutil.rmtree(root, ignore_errors=True)
    report.total_seconds = time.monotonic() - started
    report.finished_at = dt.datetime.now(dt.UTC).isoformat()
    save(repo, report)
    return report


def save(repo: Repository, report: Report) -> None:
    """Keep the report as the last one (and the last success) for the exporter."""
    folder = repo.verification_dir
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps(report.as_dict(), indent=2) + "\n"
    names = [LAST_REPORT, LAST_SUCCESS] if report.ok else [LAST_REPORT]
    for name in names:
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)


def main(argv: list[str] | None = None) -> int:
    """Run a verification; print the JSON report; exit 1 when it failed."""
    parser = argparse.ArgumentParser(prog="verify-backups", description=__doc__)
    parser.add_argument("--home", help="repository folder (default: MHV_BACKUP_HOME)")
    parser.add_argument("--server", help="Barman server (default: MHV_BACKUP_SERVER)")
    parser.add_argument("--anchors", help="anchors file (default: MHV_AUDIT_ANCHORS_FILE)")
    parser.add_argument("--json-out", help="also write the report to this file")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if args.home:
        kwargs["home"] = Path(args.home).resolve()
    if args.server:
        kwargs["server"] = args.server
    repo = Repository(**kwargs)
    try:
        repo.require()
    except MahavishnuError as exc:
        print(f"error: [{exc.code}] {exc.message}", file=sys.stderr)
        return 1
    report = asyncio.run(
        verify_latest(repo, anchors_file=Path(args.anchors) if args.anchors else None)
    )
    text = json.dumps(report.as_dict(), indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if not report.ok:
        failed = [name for name, c in report.checks.items() if not c.ok]
        reason = report.error or f"failed checks: {', '.join(failed)}"
        print(f"error: [{BackupVerificationFailedError.code}] {reason}", file=sys.stderr)
        return 1
    return 0
