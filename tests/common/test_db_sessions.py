"""Database(reset_sessions=...): what survives a connection's return to the pool."""

from __future__ import annotations

import pytest

from mhv_common.db import Database
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
