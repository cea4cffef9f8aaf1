"""Shutdown and overload tests' tools: calls held in flight by a table lock, and what a
draining or saturated service says.

The test, not a timer, decides how long a call stays in flight: it holds an exclusive lock on
the table the call writes, waits until the service's connections wait on that lock, and lets
go when it has seen what it wanted to see.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mhv_cli.pgcluster import free_port
from tests.harness import (
    Deployment,
    Keys,
    ServiceProcess,
    detail,
    mhv_code,
    rich_status,
    service_env,
)


@contextlib.asynccontextmanager
async def locked(deployment: Deployment, table: str) -> AsyncIterator[None]:
    """Hold an exclusive lock on `table`: writes (and reads) of it wait until the block ends."""
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def waiting_on_lock(deployment: Deployment, service: str, *, at_least: int = 1) -> bool:
    """Whether `at_least` connections of `service` wait for a lock in this deployment's
    database."""
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
            " AND application_name = $2 AND wait_event_type = 'Lock'",
            deployment.database,
            f"mahavishnu-{service}",
        )
        return int(waiting) >= at_least
    finally:
        await conn.close()


async def health_status(channel: aio.Channel) -> int:
    """The status the service's own health answers (health is never refused)."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    return int(reply.status)


def assert_refused(error: aio.AioRpcError, code: str) -> None:
    """A refusal a caller may retry: UNAVAILABLE with `code` and a retry delay."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert mhv_code(error) == code
    retry = detail(rich_status(error), error_details_pb2.RetryInfo)
    assert retry is not None and retry.retry_delay.ToNanoseconds() > 0


def assert_draining(error: aio.AioRpcError) -> None:
    """The refusal of a service shutting down (MHV-016): retry elsewhere."""
    assert_refused(error, "MHV-016")


def assert_shed(error: aio.AioRpcError) -> None:
    """The refusal of a service at its bound of calls in progress (MHV-017)."""
    assert_refused(error, "MHV-017")


async def private_service(
    deployment: Deployment, keys: Keys, service: str, logs: Path, **settings: str
) -> ServiceProcess:
    """`service` (task or audit) as its own plaintext process on free ports, started."""
    grpc_port, metrics_port = free_port(), free_port()
    upper = service.upper()
    env = service_env(
        deployment,
        keys,
        {
            f"MHV_{upper}_GRPC_PORT": str(grpc_port),
            f"MHV_{upper}_METRICS_PORT": str(metrics_port),
            **settings,
        },
    )
    process = ServiceProcess(f"mhv_{service}", env, grpc_port, metrics_port, logs / "service.log")
    await process.start()
    return process
