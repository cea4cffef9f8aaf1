"""Shared set-up for benchmarks: a throw-away deployment and service processes."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from mhv_cli.pgcluster import binary
from tests import harness
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    scrape,
    start_order_ports,
)

__all__ = [
    "Cluster",
    "Deployment",
    "Keys",
    "ServiceProcess",
    "percentile",
    "pgbench",
    "pgvector_task_connection",
    "scrape",
    "service_env",
    "start_order_ports",
    "start_together",
    "summary",
    "wait_for_start",
]


# Benchmarks measure services as deployed: the default pool, not the test suite's small one
# (tests.harness.POOL_BUDGET). A benchmark that sizes the pool itself says so in `extra`.
PRODUCTION_POOL = {"MHV_DB_POOL_MIN_SIZE": "2", "MHV_DB_POOL_MAX_SIZE": "10"}


def service_env(
    deployment: Deployment, keys: Keys, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`tests.harness.service_env` with the production pool size unless `extra` sets one."""
    return harness.service_env(deployment, keys, {**PRODUCTION_POOL, **(extra or {})})


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    return {f"p{q}": percentile(latencies_s, q) * 1000 for q in (50, 95, 99)}


def pgbench(
    url: str,
    script: str,
    *,
    clients: int,
    threads: int,
    seconds: int,
    variables: dict[str, str] | None = None,
) -> tuple[float, list[float]]:
    """Run pgbench with a custom script; return (transactions/s, per-transaction latencies s)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "script.sql"
        path.write_text(script)
        args = [
            str(binary("pgbench")),
            "-n",
            "-M",
            "prepared",
            "-f",
            str(path),
            "-c",
            str(clients),
            "-j",
            str(threads),
            "-T",
            str(seconds),
            "-l",
            "--log-prefix",
            str(Path(tmp) / "log"),
        ]
        for key, value in (variables or {}).items():
            args += ["-D", f"{key}={value}"]
        env = dict(os.environ)
        result = subprocess.run(
            [*args, url], capture_output=True, text=True, check=True, cwd=tmp, env=env
        )
        tps_match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
        tps = float(tps_match.group(1)) if tps_match else math.nan
        latencies = []
        for log in Path(tmp).glob("log*"):
            for line in log.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    latencies.append(int(parts[2]) / 1e6)
    return tps, latencies


async def admin_execute(url: str, sql: str, *args: object) -> object:
    """Run one statement as administrator."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@asynccontextmanager
async def pgvector_task_connection(database_url: str | None) -> AsyncIterator[asyncpg.Connection]:
    """The task role's connection to a throw-away migrated database on a server with pgvector.

    A private cluster from the pgserver build (which ships pgvector) unless `database_url` is an
    administrator URL; the database, its roles and a private cluster are gone afterwards.
    """
    cluster = Cluster(database_url) if database_url else await Cluster.start_private()
    deployment = await Deployment.create(cluster)
    try:
        conn = await asyncpg.connect(deployment.role_url("task"))
        try:
            if await conn.fetchval("SELECT to_regclass('task_embeddings')") is None:
                raise SystemExit("this server has no pgvector: semantic search cannot be measured")
            yield conn
        finally:
            await conn.close()
    finally:
        await deployment.drop()
        await cluster.close()


async def start_together(procs: Sequence[subprocess.Popen[str]]) -> float:
    """Wait until each client process has said it is ready, then send all one start time.

    The start is a `time.monotonic` instant a moment ahead: that clock is the same for every
    process on Linux, so the clients' measured windows and the driver's coincide.
    """
    for proc in procs:
        assert proc.stdout is not None
        if (await asyncio.to_thread(proc.stdout.readline)).strip() != "ready":
            raise RuntimeError("a bench client could not connect")
    start = time.monotonic() + 0.1
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()
    return start


async def wait_for_start() -> float:
    """A client process's side of `start_together`: say ready, return the start time."""
    print("ready", flush=True)
    return float(await asyncio.to_thread(sys.stdin.readline))
