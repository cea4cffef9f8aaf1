"""Disaster-recovery drills, end to end on this machine; one JSON object with the figures.

    .venv/bin/python scripts/test-dr.py [--tasks 2000] [--load-seconds 3] [--clients 6]
                                        [--webhook-senders 2] [--verify] [--json-out FILE]
                                        [--keep | --root DIR]

Builds a deployment in a temporary folder (`bench.dr.site`): a primary whose commits wait for
the backup repository's WAL receiver (synchronous streaming), the three services, `--tasks`
tasks with their audit chain. Under steady load with a client ledger (`bench.dr.ledger`) it
takes a backup, then runs three scenarios:

1. ``primary_lost``: SIGKILL PostgreSQL and delete its data folder while clients write;
   `mhv restore` to the latest point into the same (now empty) place; start PostgreSQL, the WAL
   receiver and the services. RTO: loss -> all services healthy and a CreateTask succeeding.
   RPO: acknowledged CreateTask and webhook deliveries missing afterwards (and the time span
   they cover).
2. ``operator_error``: with writes stopped, ``DELETE FROM task.tasks``; `mhv restore
   --target-time` (just before it) into a side cluster; copy the rows back; every table must
   then equal what it was before the mistake. RTO: the DELETE -> rows back.
3. ``audit_integrity``: on the restored primary, once the outbox has drained, the audit
   service's verifier accepts the whole chain, it agrees with the anchors recorded before the
   loss, and every acknowledged task has its task_created event. RTO: loss -> that point.

Also printed: backup and restore throughput beside a plain copy of the same data folder (the
disk's own limit in this run), and what the machine was doing. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.dr.ledger import Ledger, start_load
from bench.dr.site import DATABASE, Site, say, wait_until
from mhv_cli import anchors
from mhv_cli.backup import folder_bytes
from mhv_cli.pgcluster import PrivateCluster, free_port
from mhv_cli.verify import verify_latest
from tests.seed import bulk_load

MIB = 2**20


def _mhv(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `mhv` command as an operator would, on this site's repository."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("mhv")), *args],
        env=site.mhv_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=3 * 3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"mhv {' '.join(args)} failed: {result.stderr.strip()[-2000:]}")
    return result


def copy_floor(source: Path, scratch: Path) -> float:
    """MiB/s of a plain recursive copy of `source`: this disk's limit for the same bytes.

    Like the backup engine's own writes, the copy is not synced file by file: both go through
    the page cache, so the comparison is fair (and a machine-wide sync would measure the other
    users of the disk).
    """
    target = scratch / "copy-floor"
    size = folder_bytes(source)
    started = time.monotonic()
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("postmaster.pid"))
    seconds = time.monotonic() - started
    shutil.rmtree(target)
    return size / MIB / seconds if seconds else 0.0


def machine() -> dict[str, Any]:
    """What ran the drill, and how busy it was."""
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(int(meminfo[1]) / 2**20, 1),
        "kernel": platform.release(),
        "load_average_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
    }


async def fingerprints(url: str) -> dict[str, tuple[int, str]]:
    """Per table of the service schemas: rows and an order-independent sum of row hashes."""
    conn = await asyncpg.connect(url)
    try:
        names = await conn.fetch(
            "SELECT schemaname || '.' || tablename AS n FROM pg_tables"
            " WHERE schemaname IN ('task', 'audit', 'webhook') ORDER BY 1"
        )
        result = {}
        for row in names:
            name = row["n"]
            counted = await conn.fetchrow(
                f"SELECT count(*) AS n, coalesce(sum(('x' || substr(md5(x::text), 1, 15))"  # nosec B608: table and column names come from the catalog, not from input
                f"::bit(60)::bigint::numeric), 0)::text AS h FROM {name} x"
            )
            result[name] = (int(counted["n"]), str(counted["h"]))
        return result
    finally:
        await conn.close()


async def copy_rows(source_url: str, target_url: str, table: str) -> int:
    """Stream every row of `table` from one database into the other (COPY, binary)."""
    schema, name = table.split(".")
    src = await asyncpg.connect(source_url)
    dst = await asyncpg.connect(target_url)
    try:
        columns = [
            r["attname"]
            for r in await src.fetch(
                "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
                " AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                table,
            )
        ]
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

        async def produce() -> None:
            async def sink(chunk: bytes) -> None:
                await queue.put(bytes(chunk))

            try:
                await src.copy_from_query(
                    f"SELECT {', '.join(columns)} FROM {table}",  # nosec B608: table and column names come from the catalog, not from input
                    output=sink,
                    format="binary",
                )
            finally:
                await queue.put(None)

        async def chunks() -> Any:
            while (chunk := await queue.get()) is not None:
                yield chunk

        producer = asyncio.create_task(produce())
        status = await dst.copy_to_table(
            name, schema_name=schema, source=chunks(), columns=columns, format="binary"
        )
        await producer
        return int(status.split()[-1])
    finally:
        await src.close()
        await dst.close()


async def primary_lost(site: Site, ledger: Ledger, args: argparse.Namespace) -> dict[str, Any]:
    """Scenario 1 (see the module docstring)."""
    stop = asyncio.Event()
    load = start_load(site, ledger, stop, clients=args.clients, senders=args.webhook_senders)
    await asyncio.sleep(args.load_seconds / 2)
    anchor = await anchors.record(site.admin_url, site.anchors)
    say(f"anchor at audit row {anchor.head_id} recorded under load")
    await asyncio.sleep(args.load_seconds / 2)
    acknowledged_before = ledger.acknowledged
    say(f"primary lost after {acknowledged_before} acknowledged writes")
    loss_wall = time.time()
    loss = time.monotonic()
    site.kill_primary()
    await asyncio.sleep(1.0)  # clients keep writing into the outage
    stop.set()
    await asyncio.gather(*load)
    phases: dict[str, float] = {}
    mark = time.monotonic()
    await site.stop_services()
    site.stop_receiver()
    phases["stop_services"] = time.monotonic() - mark
    mark = time.monotonic()
    _mhv(site, "restore", "--destination", str(site.cluster.data_dir))
    phases["restore"] = time.monotonic() - mark
    restored_bytes = folder_bytes(site.cluster.data_dir)
    mark = time.monotonic()
    await site.start_database()
    phases["postgres_recovery"] = time.monotonic() - mark
    mark = time.monotonic()
    await site.start_receiver()
    phases["wal_receiver"] = time.monotonic() - mark
    mark = time.monotonic()
    await site.start_services()
    phases["services_healthy"] = time.monotonic() - mark
    mark = time.monotonic()
    serving = await site.first_write()
    phases["first_write"] = serving - mark
    rto = serving - loss
    lost_tasks, lost_deliveries = await ledger.missing(site.admin_url)
    lost_at = [*lost_tasks.values(), *lost_deliveries.values()]
    return {
        "rto_seconds": round(rto, 2),
        "rpo_seconds": round(loss_wall - min(lost_at), 3) if lost_at else 0.0,
        "lost_acknowledged_writes": len(lost_at),
        "acknowledged": {"create_task": len(ledger.tasks), "webhook": len(ledger.deliveries)},
        "lost": {"create_task": len(lost_tasks), "webhook": len(lost_deliveries)},
        "refused_during_load_and_outage": dict(ledger.errors),
        "phases_seconds": {k: round(v, 2) for k, v in phases.items()},
        "restored_bytes": restored_bytes,
        "restore_mib_per_s": round(restored_bytes / MIB / phases["restore"], 1),
        "ok": not lost_at,
        "_loss": loss,
        "_loss_wall": loss_wall,
    }


async def audit_integrity(site: Site, ledger: Ledger, loss: float) -> dict[str, Any]:
    """Scenario 3 (see the module docstring)."""

    async def drained() -> bool:
        conn = await asyncpg.connect(site.admin_url)
        try:
            return not await conn.fetchval(
                "SELECT count(*) FROM task.outbox WHERE delivered_at IS NULL"
            )
        finally:
            await conn.close()

    await wait_until(drained, timeout=600)
    verification = await anchors.verify_chain(site.admin_url)
    conn = await asyncpg.connect(site.admin_url)
    try:
        comparison = await anchors.compare(conn, anchors.load(site.anchors))
        recorded = await conn.fetch(
            "SELECT DISTINCT task_id FROM audit.task_audit_log"
            " WHERE event_type = 'task_created' AND task_id = ANY($1::bigint[])",
            list(ledger.tasks),
        )
    finally:
        await conn.close()
    done = time.monotonic()
    missing = set(ledger.tasks) - {r["task_id"] for r in recorded}
    ok = verification.ok and comparison.ok and comparison.checked > 0 and not missing
    return {
        "rto_seconds": round(done - loss, 2),
        "rpo_seconds": 0.0 if not missing else None,
        "lost_acknowledged_writes": len(missing),
        "chain_verified": verification.ok,
        "rows_checked": verification.rows_checked,
        "anchors_compared": comparison.checked,
        "anchors_contradicted": len(comparison.mismatched) + len(comparison.missing),
        "acknowledged_tasks_with_audit_event": len(ledger.tasks) - len(missing),
        "ok": ok,
    }


async def operator_error(site: Site, scratch: Path) -> dict[str, Any]:
    """Scenario 2 (see the module docstring)."""
    await site.stop_services()
    before = await fingerprints(site.admin_url)
    conn = await asyncpg.connect(site.admin_url)
    try:
        target = await conn.fetchval("SELECT clock_timestamp()")
        await asyncio.sleep(1.0)
        error = time.monotonic()
        deleted = int((await conn.execute("DELETE FROM task.tasks")).split()[-1])
    finally:
        await conn.close()
    say(f"operator error: {deleted} tasks deleted; restoring to {target.isoformat()}")
    phases: dict[str, float] = {}
    side = PrivateCluster(
        scratch / "side",
        free_port(),
        settings={"synchronous_standby_names": ""},
        bin_dir=site.cluster.bin_dir,
    )
    mark = time.monotonic()
    _mhv(
        site,
        "restore",
        "--destination",
        str(side.data_dir),
        "--target-time",
        target.isoformat(),
    )
    phases["restore"] = time.monotonic() - mark
    (side.root / "superuser.password").write_text(site.cluster.password_file.read_text())
    mark = time.monotonic()
    await asyncio.to_thread(side.start, timeout=1800)

    async def promoted() -> bool:
        c = await asyncpg.connect(side.url())
        try:
            return not await c.fetchval("SELECT pg_is_in_recovery()")
        finally:
            await c.close()

    await wait_until(promoted, timeout=1800)
    phases["side_recovery"] = time.monotonic() - mark
    mark = time.monotonic()
    recovered = await copy_rows(side.url(DATABASE), site.admin_url, "task.tasks")
    phases["copy_back"] = time.monotonic() - mark
    back = time.monotonic()
    after = await fingerprints(site.admin_url)
    await asyncio.to_thread(side.stop, mode="immediate")
    changed = sorted(name for name in before if before[name] != after.get(name))
    return {
        "rto_seconds": round(back - error, 2),
        "rpo_seconds": 0.0 if recovered == deleted else None,
        "lost_acknowledged_writes": max(deleted - recovered, 0),
        "rows_deleted": deleted,
        "rows_recovered": recovered,
        "tables_compared": len(before),
        "tables_differing_from_before_the_mistake": changed,
        "phases_seconds": {k: round(v, 2) for k, v in phases.items()},
        "ok": recovered == deleted and not changed,
    }


async def drill(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Set up, back up under load, run the three scenarios."""
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    site = Site.create(root)
    try:
        say(f"primary on port {site.cluster.port}, repository {site.repo.home}")
        await site.init()
        conn = await asyncpg.connect(site.admin_url)
        try:
            started = time.monotonic()
            await bulk_load(
                conn,
                tasks=args.tasks,
                progress=lambda done: say(f"seeded {done} of {args.tasks} tasks"),
            )
            seeded = time.monotonic() - started
            database_bytes = int(await conn.fetchval("SELECT pg_database_size(current_database())"))
            version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        result["data"] = {
            "tasks_seeded": args.tasks,
            "seed_seconds": round(seeded, 1),
            "database_bytes": database_bytes,
            "postgresql": version,
        }
        floor = copy_floor(site.cluster.data_dir, root)
        say("starting the services")
        await site.start_services()
        ledger = Ledger()
        stop = asyncio.Event()
        load = start_load(site, ledger, stop, clients=args.clients, senders=args.webhook_senders)
        say("backup under load (mhv backup run)")
        done = await asyncio.to_thread(_mhv, site, "backup", "run")
        stop.set()
        await asyncio.gather(*load)
        figures = re.search(
            r"backup (\S+): ([\d.]+) MiB of databases in ([\d.]+) s .* ([\d.]+) MiB stored",
            done.stdout,
        )
        assert figures is not None, done.stdout
        backup_id, size_mib, seconds = (
            figures.group(1),
            float(figures.group(2)),
            float(figures.group(3)),
        )
        rate = size_mib / seconds
        result["backup"] = {
            "backup_id": backup_id,
            "seconds": seconds,
            "database_bytes": int(size_mib * MIB),
            "stored_bytes": int(float(figures.group(4)) * MIB),
            "mib_per_s": round(rate, 1),
            "disk_copy_mib_per_s": round(floor, 1),
            "ratio_to_disk_copy": round(rate / floor, 3) if floor else None,
        }
        if args.verify:
            say("verifying the backup (scripts/verify-backups.py)")
            report = await verify_latest(site.repo, anchors_file=site.anchors)
            result["verification"] = report.as_dict()
        say("scenario primary_lost")
        lost = await primary_lost(site, ledger, args)
        lost.pop("_loss_wall")
        loss = lost.pop("_loss")
        lost["restore_ratio_to_disk_copy"] = (
            round(lost["restore_mib_per_s"] / floor, 3) if floor else None
        )
        say(f"primary_lost: {json.dumps(lost)}")
        say("scenario audit_integrity")
        audit = await audit_integrity(site, ledger, loss)
        say(f"audit_integrity: {json.dumps(audit)}")
        say("scenario operator_error")
        mistake = await operator_error(site, root)
        say("done")
        result["scenarios"] = {
            "primary_lost": lost,
            "operator_error": mistake,
            "audit_integrity": audit,
        }
        result["ok"] = all(s["ok"] for s in result["scenarios"].values()) and (
            result.get("verification", {}).get("ok", True)
        )
    finally:
        with contextlib.suppress(Exception):
            await site.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the drills; print the JSON; exit 1 when a check failed."""
    parser = argparse.ArgumentParser(prog="test-dr", description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks in the database")
    parser.add_argument("--load-seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=6, help="CreateTask clients")
    parser.add_argument("--webhook-senders", type=int, default=2)
    parser.add_argument(
        "--verify", action="store_true", help="also verify the backup (verify-backups)"
    )
    parser.add_argument("--json-out", help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--root", help="work in this (empty) folder and keep it")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the site stops its services, receiver and PostgreSQL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="mhv-dr-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(drill(args, root))
    finally:
        if args.keep or args.root:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0 if result.get("ok") else 1
