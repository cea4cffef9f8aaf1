"""The shared mechanism: whatever asyncpg raises when the connection goes, MHV-002 (retryable).

The drills of this package show it through the services; these pin it where it lives
(`mhv_common.db`, `mhv_common.edge.classify`), class by class and on a real backend terminated
in the middle of a transaction.
"""

from __future__ import annotations

import asyncpg
import pytest

from mhv_cli.pgcluster import free_port
from mhv_common.db import Database
from mhv_common.edge import classify
from mhv_common.errors import DatabaseConnectionError, DeadlineExceededError, InternalError
from tests.harness import Deployment

# What asyncpg raised, at one moment or another, when PostgreSQL restarted or a backend was
# terminated under load.
LOSSES = [
    ConnectionRefusedError(111, "Connect call failed"),
    ConnectionResetError(104, "Connection reset by peer"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
    asyncpg.exceptions.ConnectionFailureError("connection failure"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.exceptions.InterfaceError("connection is closed"),
    asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (12) is in progress"
    ),
]


@pytest.mark.parametrize("exc", LOSSES, ids=lambda e: type(e).__name__)
def test_every_connection_loss_is_retryable_mhv_002(exc: BaseException) -> None:
    error = classify(exc)
    assert isinstance(error, DatabaseConnectionError)
    assert error.retry_after is not None and error.retry_after > 0


def test_a_cancelled_statement_stays_a_deadline_and_a_bug_stays_internal() -> None:
    assert isinstance(classify(asyncpg.exceptions.QueryCanceledError("x")), DeadlineExceededError)
    assert isinstance(classify(ValueError("a bug")), InternalError)


async def _terminate(deployment: Deployment, application_name: str) -> None:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            application_name,
        )
    finally:
        await conn.close()


async def _lose_connection_in(db: Database, block: str, deployment: Deployment) -> None:
    async with getattr(db, block)() as conn:
        await conn.fetchval("SELECT 1")
        await _terminate(deployment, f"mahavishnu-loss-{block}")
        # The server is gone: whatever this raises, the caller sees MHV-002.
        await conn.fetchval("SELECT pg_sleep(0.1)")


@pytest.mark.parametrize("block", ["transaction", "connection"])
async def test_a_backend_terminated_mid_block_is_mhv_002(
    deployment: Deployment, block: str
) -> None:
    db = Database(deployment.role_url("task"), name=f"loss-{block}", min_size=1, max_size=1)
    await db.open()
    try:
        with pytest.raises(DatabaseConnectionError):
            await _lose_connection_in(db, block, deployment)
        # The pool took the dead connection back and hands out a new one.
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
        assert await db.reachable(timeout=5.0)
    finally:
        await db.close()


async def test_an_unreachable_database_is_not_ready(deployment: Deployment) -> None:
    db = Database(deployment.role_url("task"), name="ready", min_size=1, max_size=1)
    await db.open()
    try:
        assert await db.reachable(timeout=5.0)
        # Every connection busy is not unreachable: readiness must not flap under load.
        async with db.connection():
            assert await db.reachable(timeout=0.5)
    finally:
        await db.close()
    # Nothing listens on that port (a pool of no connections opens without connecting).
    closed = Database(
        f"postgresql://nobody@127.0.0.1:{free_port()}/none", name="closed", min_size=0
    )
    await closed.open()
    try:
        assert not await closed.reachable(timeout=2.0)
    finally:
        await closed.close()
