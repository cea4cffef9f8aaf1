"""Audit log benchmarks: listing by task on a large log, chain verification, recording.

Run from the repository root::

    .venv/bin/python -m bench.audit_bench                 # 1,000,000 rows
    .venv/bin/python -m bench.audit_bench --rows 100000   # a quicker look

It creates a throw-away database (and roles) on the same PostgreSQL the tests use
(``MHV_TEST_DATABASE_URL``, else 127.0.0.1:5432 as ``postgres``, else a private cluster), loads
it with a properly chained log, starts the audit service as its own process, measures, prints,
and drops everything. Each figure is printed next to a physical-limit reference measured in the
same run, with the ratio:

- ListAuditEvents by task id through gRPC (goal p95 <= 5 ms) against the same SQL run by a bare
  asyncpg loop and by pgbench;
- VerifyAuditChain over the whole log (goal >= 100k events/s on one core: the service is one
  Python process) against SHA-256 alone over the same canonical encodings, with the time split
  into reading rows and encoding plus hashing them;
- RecordEvents throughput with a few concurrent writers (no goal; for reference).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._env import service_env
from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_audit import (
    GENESIS_HASH,
    AuditStore,
    ChainedEvent,
    ChainHead,
    ChainScanner,
    NewEvent,
    canonical_json,
    encode_record,
    link,
)
from mhv_audit._store import ROW_COLUMNS
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from mhv_common.db import Database
from mhv_common.timestamps import from_micros
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    bearer,
    make_person,
)

EVENT_TYPES = ["task_created", "task_updated", "task_assigned", "task_started", "task_completed"]
LIST_SQL = (
    f"SELECT {ROW_COLUMNS} FROM audit.task_audit_log WHERE task_id = $1 ORDER BY id DESC LIMIT $2"  # nosec B608: ROW_COLUMNS is a constant; values are bound
)
PAGE = 50


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<46} {value:>16}  {note}")


# --- Loading ---------------------------------------------------------------------------------


def _details_pool(rng: random.Random) -> list[str]:
    pool = []
    for n in range(200):
        details = {
            "title": f"Fix flaky test {n}",
            "description": f"[REDACTED ({rng.randint(10, 900)} characters)]",
            "changes": {"priority": ["low", "high"], "labels": ["ci", f"area-{n % 7}"]},
            "repository": "demo",
        }
        pool.append(canonical_json(json.dumps(details)))
    return pool


async def load(admin_url: str, *, rows: int, tasks: int, seed: int = 7) -> None:
    """Append `rows` properly chained events straight into the table (COPY, triggers off)."""
    rng = random.Random(seed)
    details = _details_pool(rng)
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(1000)]
    conn = await asyncpg.connect(admin_url)
    try:
        # The row trigger would check each link again; this loader computes them itself.
        await conn.execute("SET session_replication_role = replica")
        head_id, head_hash = 0, GENESIS_HASH
        start = time.perf_counter()
        occur = 1_735_000_000_000_000
        chunk = 20_000
        while head_id < rows:
            count = min(chunk, rows - head_id)
            batch = []
            for _ in range(count):
                occur += rng.randint(1, 5_000_000)
                batch.append(
                    NewEvent(
                        event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                        task_id=rng.randint(1, tasks),
                        event_type=rng.choice(EVENT_TYPES),
                        user_id=rng.choice(users),
                        details=rng.choice(details),
                        occur_us=occur,
                        request_id=f"req-{rng.getrandbits(48):012x}",
                        trace_id=f"{rng.getrandbits(128):032x}",
                    )
                )
            chained = link(batch, head_id=head_id, head_hash=head_hash, created_us=occur + 1000)
            await conn.copy_records_to_table(
                "task_audit_log",
                schema_name="audit",
                columns=[
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
                ],
                records=[
                    (
                        r.id,
                        r.event.event_id,
                        r.event.task_id,
                        r.event.event_type,
                        r.event.user_id,
                        r.event.details,
                        from_micros(r.event.occur_us),
                        from_micros(r.created_us),
                        r.event.request_id,
                        r.event.trace_id,
                        r.prev_hash,
                        r.hash,
                    )
                    for r in chained
                ],
            )
            head_id, head_hash = chained[-1].id, chained[-1].hash
        await conn.execute("RESET session_replication_role")
        await conn.execute(
            "UPDATE audit.chain_head SET last_id = $1, last_hash = $2", head_id, head_hash
        )
        await conn.execute("VACUUM ANALYZE audit.task_audit_log")
        size = await conn.fetchval("SELECT pg_total_relation_size('audit.task_audit_log')")
        print(
            f"loaded {rows:,} chained rows over {tasks:,} tasks in "
            f"{time.perf_counter() - start:.1f} s ({size / 2**20:.0f} MiB with indexes)"
        )
    finally:
        await conn.close()


# --- ListAuditEvents ---------------------------------------------------------------------------


async def bench_list(target: str, keys: Keys, admin_url: str, *, tasks: int, calls: int) -> None:
    rng = random.Random(11)
    task_ids = [rng.randint(1, tasks) for _ in range(calls)]
    metadata = bearer(keys.token(Role.AUDITOR))
    async with aio.insecure_channel(target) as channel:
        client = audit_pb2_grpc.AuditServiceStub(channel)  # type: ignore[no-untyped-call]
        for task_id in task_ids[:100]:  # warm the connection, the pool, the plan cache
            await client.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(task_id=task_id), metadata=metadata
            )
        health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        floor_ms = []
        for _ in task_ids:
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest())
            floor_ms.append((time.perf_counter() - started) * 1000)
        service_ms = []
        returned = 0
        for task_id in task_ids:
            started = time.perf_counter()
            reply = await client.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(task_id=task_id, page_size=PAGE),
                metadata=metadata,
            )
            service_ms.append((time.perf_counter() - started) * 1000)
            returned += len(reply.events)

    conn = await asyncpg.connect(admin_url)
    try:
        statement = await conn.prepare(LIST_SQL)
        for task_id in task_ids[:100]:
            await statement.fetch(task_id, PAGE + 1)
        raw_ms = []
        for task_id in task_ids:
            started = time.perf_counter()
            await statement.fetch(task_id, PAGE + 1)
            raw_ms.append((time.perf_counter() - started) * 1000)
    finally:
        await conn.close()

    pgbench_ms = await asyncio.to_thread(_pgbench_list, admin_url, tasks)

    print(f"\nListAuditEvents by task id ({calls:,} calls, {returned / calls:.1f} events/page)")
    for name, values in (
        ("service over gRPC", service_ms),
        ("reference: same SQL, bare asyncpg loop", raw_ms),
        ("reference: same SQL, pgbench (prepared)", pgbench_ms),
        ("reference: gRPC round trip (Health/Check)", floor_ms),
    ):
        if not values:
            line(name, "n/a", "(pgbench not found)")
            continue
        line(
            name,
            f"p95 {pct(values, 0.95):.3f} ms",
            f"p50 {statistics.median(values):.3f} ms, p99 {pct(values, 0.99):.3f} ms",
        )
    line("goal", "p95 <= 5 ms", "met" if pct(service_ms, 0.95) <= 5 else "NOT met")
    line("ratio service / asyncpg p95", f"{pct(service_ms, 0.95) / pct(raw_ms, 0.95):.2f}x")
    if pgbench_ms:
        line("ratio service / pgbench p95", f"{pct(service_ms, 0.95) / pct(pgbench_ms, 0.95):.2f}x")


def _pgbench_list(admin_url: str, tasks: int) -> list[float]:
    pgbench = subprocess.run(
        ["which", "pgbench"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not pgbench:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "list.sql"
        script.write_text(
            f"\\set tid random(1, {tasks})\n"
            + LIST_SQL.replace("$1", ":tid").replace("$2", str(PAGE + 1))
            + ";\n"
        )
        subprocess.run(
            [
                pgbench,
                "-n",
                "-M",
                "prepared",
                "-c",
                "1",
                "-T",
                "5",
                "-f",
                str(script),
                "-l",
                "--log-prefix",
                str(Path(tmp) / "log"),
                admin_url,
            ],
            cwd=tmp,
            capture_output=True,
            check=True,
        )
        latencies = []
        for log in Path(tmp).glob("log*"):
            for entry in log.read_text().splitlines():
                latencies.append(int(entry.split()[2]) / 1000)
        return latencies


# --- VerifyAuditChain ----------------------------------------------------------------------


async def bench_verify(target: str, keys: Keys, admin_url: str, *, rows: int) -> None:
    async with aio.insecure_channel(target) as channel:
        client = audit_pb2_grpc.AuditServiceStub(channel)  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        result = await client.VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(),
            metadata=bearer(keys.token(Role.AUDITOR)),
            timeout=900,
        )
        service_s = time.perf_counter() - started
    assert result.ok, result
    assert result.rows_checked == rows, result

    # The same work split in two, on a sample held in memory: reading rows, then checking them.
    sample = min(rows, 200_000)
    conn = await asyncpg.connect(admin_url)
    try:
        started = time.perf_counter()
        fetched = []
        after = -1
        while len(fetched) < sample:
            chunk = await conn.fetch(
                # What the service reads while `details` is the generated column.
                f"SELECT {ROW_COLUMNS}, true FROM audit.task_audit_log"  # nosec B608: ROW_COLUMNS is a constant; values are bound
                " WHERE id > $1 ORDER BY id LIMIT 4000",
                after,
            )
            fetched.extend(chunk)
            after = chunk[-1][0]
        read_s = time.perf_counter() - started
    finally:
        await conn.close()
    scanner = ChainScanner(expected_id=1, expected_prev=GENESIS_HASH, head_id=None)
    started = time.perf_counter()
    for at in range(0, len(fetched), 4000):
        assert scanner.feed(fetched[at : at + 4000]) is None
    scan_s = time.perf_counter() - started
    encoded = [
        encode_record(
            row_id=r[0],
            created_us=r[7],
            details=r[5],
            event_id=r[1],
            event_type=r[3],
            occur_us=r[6],
            prev_hash=r[10],
            request_id=r[8],
            task_id=r[2],
            trace_id=r[9],
            user_id=r[4],
        )
        for r in fetched
    ]
    sha256 = hashlib.sha256
    started = time.perf_counter()
    for data in encoded:
        sha256(data).digest()
    hash_s = time.perf_counter() - started
    mean_bytes = sum(map(len, encoded)) / len(encoded)

    service_rate = rows / service_s
    hash_rate = len(encoded) / hash_s
    print(f"\nVerifyAuditChain over {rows:,} rows (canonical encoding {mean_bytes:.0f} bytes/row)")
    line("service over gRPC, end to end", f"{service_rate:,.0f} ev/s", f"{service_s:.2f} s")
    line("  of which: reading rows (asyncpg, same SQL)", f"{len(fetched) / read_s:,.0f} ev/s")
    line("  of which: encode + hash + compare (1 core)", f"{len(fetched) / scan_s:,.0f} ev/s")
    line("reference: SHA-256 alone over the encodings", f"{hash_rate:,.0f} ev/s")
    line("goal", ">= 100,000 ev/s", "met" if service_rate >= 100_000 else "NOT met")
    line("ratio service / SHA-256 alone", f"{service_rate / hash_rate:.2f}")


# --- RecordEvents ------------------------------------------------------------------------------


async def bench_record(
    target: str, keys: Keys, role_url: str, *, seconds: float, writers: int
) -> None:
    metadata = bearer(keys.token(Role.SERVICE, subject="service:task"))
    latencies: list[float] = []
    recorded = 0
    deadline = time.perf_counter() + seconds

    def batch() -> list[audit_pb2.EventRecord]:
        now = time.time()
        out = []
        for n in range(200):
            record = audit_pb2.EventRecord(
                event_id=str(uuid.uuid4()),
                task_id=random.randint(1, 10_000),
                event_type="task_updated",
                user_id=str(uuid.uuid4()),
                request_id=f"req-{n}",
            )
            record.details.update({"title": f"step {n}", "changes": {"status": ["a", "b"]}})
            record.occur_time.FromNanoseconds(int(now * 1e9))
            out.append(record)
        return out

    async def writer(client: audit_pb2_grpc.AuditServiceStub) -> None:
        nonlocal recorded
        while time.perf_counter() < deadline:
            events = batch()
            started = time.perf_counter()
            reply = await client.RecordEvents(
                audit_pb2.RecordEventsRequest(events=events), metadata=metadata, timeout=30
            )
            latencies.append((time.perf_counter() - started) * 1000)
            recorded += reply.recorded

    async with aio.insecure_channel(target) as channel:
        client = audit_pb2_grpc.AuditServiceStub(channel)  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        await asyncio.gather(*(writer(client) for _ in range(writers)))
        elapsed = time.perf_counter() - started

    # Reference: the same append transaction (lock, duplicate check, multi-row INSERT, head,
    # commit) straight through the store, one writer, no gRPC and no validation.
    db = Database(role_url, name="bench", min_size=1, max_size=1)
    await db.open()
    try:
        store = AuditStore(db)
        raw_ms: list[float] = []
        raw_events = 0
        for _ in range(20):
            fresh = [
                NewEvent(
                    event_id=str(uuid.uuid4()),
                    task_id=random.randint(1, 10_000),
                    event_type="task_updated",
                    user_id=str(uuid.uuid4()),
                    details='{"changes":{"status":["a","b"]},"title":"step"}',
                    occur_us=int(time.time() * 1e6),
                    request_id="req",
                    trace_id="",
                )
                for _ in range(200)
            ]

            # Called within this iteration, so binding `fresh` late is what is wanted.
            def build(head: ChainHead, _known: frozenset[str], now: int) -> list[ChainedEvent]:
                return link(fresh, head_id=head.last_id, head_hash=head.last_hash, created_us=now)  # noqa: B023

            started = time.perf_counter()
            rows, _known = await store.append([e.event_id for e in fresh], build)
            raw_ms.append((time.perf_counter() - started) * 1000)
            raw_events += len(rows)
    finally:
        await db.close()

    print(f"\nRecordEvents, {writers} concurrent writers, batches of 200, {seconds:.0f} s")
    line("service over gRPC: throughput", f"{recorded / elapsed:,.0f} ev/s")
    line(
        "service over gRPC: batch latency",
        f"p95 {pct(latencies, 0.95):.1f} ms",
        f"p50 {statistics.median(latencies):.1f} ms",
    )
    line(
        "reference: store append alone, 1 writer",
        f"{raw_events / (sum(raw_ms) / 1000):,.0f} ev/s",
        f"p50 {statistics.median(raw_ms):.1f} ms per batch",
    )


# --- Main ----------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    process: ServiceProcess | None = None
    try:
        print(f"database {deployment.database} (dropped at the end); {os.cpu_count()} cores")
        await load(deployment.admin_url, rows=args.rows, tasks=args.tasks)
        with tempfile.TemporaryDirectory() as tmp:
            keys = Keys.create(Path(tmp) / "keys")
            # The audit service checks the auditor's user with the task service: one that
            # relays nothing, holding that user.
            keys.people[str(Role.AUDITOR)] = await make_person(deployment, "bench-auditor")
            task_port, task_metrics = free_port(), free_port()
            directory = ServiceProcess(
                "mhv_task",
                service_env(
                    deployment,
                    keys,
                    {
                        "MHV_TASK_GRPC_PORT": str(task_port),
                        "MHV_TASK_METRICS_PORT": str(task_metrics),
                        "MHV_RELAY_ENABLED": "false",
                        "MHV_LOG_LEVEL": "WARNING",
                    },
                ),
                task_port,
                task_metrics,
                Path(tmp) / "task.log",
            )
            await directory.start()
            grpc_port, metrics_port = free_port(), free_port()
            env = service_env(
                deployment,
                keys,
                {
                    "MHV_AUDIT_GRPC_PORT": str(grpc_port),
                    "MHV_AUDIT_METRICS_PORT": str(metrics_port),
                    "MHV_TASK_TARGET": f"127.0.0.1:{task_port}",
                    "MHV_LOG_LEVEL": "WARNING",
                    "MHV_RATE_LIMITS": json.dumps(
                        {"general": "10000000/minute", "service:*": "10000000/minute"}
                    ),
                },
            )
            process = ServiceProcess(
                "mhv_audit", env, grpc_port, metrics_port, Path(tmp) / "audit.log"
            )
            await process.start()
            await bench_list(
                process.target, keys, deployment.admin_url, tasks=args.tasks, calls=args.calls
            )
            await bench_verify(process.target, keys, deployment.admin_url, rows=args.rows)
            await bench_record(
                process.target,
                keys,
                deployment.role_url("audit"),
                seconds=args.record_seconds,
                writers=4,
            )
            process.stop()
            process = None
            directory.stop()
    finally:
        if process is not None:
            process.stop()
        await deployment.drop()
        await cluster.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=100_000, help="distinct task ids")
    parser.add_argument("--calls", type=int, default=2000, help="ListAuditEvents calls")
    parser.add_argument("--record-seconds", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
