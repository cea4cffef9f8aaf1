"""Database(reset_sessions=...): what survives a connection's return to the pool."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from mhv_common.db import Database
from mhv_common.errors import DatabaseConnectionError, DeadlineExceededError
from tests.harness import Deployment


@pytest.mark.parametrize("reset_sessions", [True, False])
async def test_session_state_and_open_transactions_on_release(
    deployment: Deployment, reset_sessions: bool
) -> None:
    db = Database(
        deployment.role_url("webhook"),
        name=f"sessions-{reset_sessions}",
        min_size=1,
        max_size=1,
        reset_sessions=reset_sessions,
    )
    await db.open()
    try:
        async with db.connection() as conn:
            await conn.execute("SET application_name = 'changed-by-a-caller'")
            # A transaction left open by careless code.
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_open (id int)")
        async with db.connection() as conn:
            name = await conn.fetchval("SHOW application_name")
            # The open transaction was rolled back either way.
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_class WHERE relname = 'left_open'"
            )
            assert not conn.is_in_transaction()
        # Session settings are reset only when asked to.
        assert (name == "changed-by-a-caller") is (not reset_sessions)
    finally:
        await db.close()


async def test_connections_go_back_to_the_pool_after_success_failure_and_cancellation(
    deployment: Deployment,
) -> None:
    # One connection: every checkout below gets it only if the one before gave it back.
    db = Database(deployment.role_url("webhook"), name="returns", min_size=1, max_size=1)
    await db.open()
    try:
        async with db.connection(timeout=30) as conn:
            assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            async with db.connection(timeout=30) as conn:
                await conn.fetchval("SELECT * FROM no_such_table")
        started = asyncio.Event()

        async def stuck() -> None:
            async with db.connection(timeout=30) as conn:
                started.set()
                await conn.execute("SELECT pg_sleep(60)")

        task = asyncio.create_task(stuck())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancelled statement was cancelled in the server too: the connection is usable.
        async with db.connection(timeout=30) as conn:
            assert await conn.fetchval("SELECT 2") == 2
        async with db.transaction(timeout=30) as conn:
            assert await conn.fetchval("SELECT 3") == 3
        assert db.pool.get_idle_size() == 1
    finally:
        await db.close()


async def test_a_statement_past_its_timeout_is_a_missed_deadline_not_a_lost_connection(
    deployment: Deployment,
) -> None:
    db = Database(deployment.role_url("webhook"), name="timeouts", min_size=1, max_size=1)
    await db.open()
    try:
        # The connection is checked out first, so it is the statement that runs out of time.
        with pytest.raises(TimeoutError) as raised:
            async with db.connection(timeout=30) as conn:
                await conn.execute("SELECT pg_sleep(60)", timeout=0.2)
        assert not isinstance(raised.value, DatabaseConnectionError)
        with pytest.raises(DeadlineExceededError):
            async with db.transaction(timeout=30) as conn:
                await conn.execute("SELECT pg_sleep(60)", timeout=0.2)
        # The timed-out statements were cancelled in the server: the connection is usable.
        async with db.connection(timeout=30) as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await db.close()
