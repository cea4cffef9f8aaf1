"""Background jobs against the real inbox: the delivery purge and the inbox gauges.

(The dedup purge runs in the gateway process: test_gateway.py.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from mhv_common.db import Database
from mhv_webhook._jobs import DeliveryPurger, InboxGauges
from mhv_webhook._store_inbox import Inbox
from mhv_webhook._store_saga import Sagas
from tests.harness import Deployment
from tests.webhook.support import metric

_STATES = ("pending", "processing", "completed", "ignored", "compensated", "dead_letter")


@pytest.fixture(scope="module")
async def db(deployment: Deployment) -> AsyncIterator[Database]:
    database = Database(deployment.role_url("webhook"), name="webhook", min_size=1, max_size=2)
    await database.open()
    yield database
    await database.close()


async def _delivery(conn: asyncpg.Connection, state: str, age_seconds: float) -> uuid.UUID:
    row_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO deliveries (id, source, delivery_id, event, action, body, state,"
        " received_at, updated_at)"
        " VALUES ($1, 'jobs', $2, 'issues', 'opened', '\\x7b7d', $3,"
        " now() - make_interval(secs => $4), now() - make_interval(secs => $4))",
        row_id,
        str(row_id),
        state,
        age_seconds,
    )
    await conn.execute(
        "INSERT INTO saga_log (delivery_id, idempotency_key) VALUES ($1, $2)",
        row_id,
        f"webhook:{row_id}",
    )
    return row_id


async def test_finished_deliveries_go_after_their_retention_open_ones_never(
    db: Database, webhook_db: asyncpg.Connection
) -> None:
    old = {state: await _delivery(webhook_db, state, 7200) for state in _STATES}
    recent = await _delivery(webhook_db, "completed", 600)
    purged_before = metric("webhook_deliveries_purged_total")
    await DeliveryPurger(Sagas(db), retention_seconds=3600, interval=60).tick()
    left = {
        r["id"]
        for r in await webhook_db.fetch(
            "SELECT id FROM deliveries WHERE id = ANY($1::uuid[])", [*old.values(), recent]
        )
    }
    assert left == {old["pending"], old["processing"], old["dead_letter"], recent}
    # Their saga logs went with them.
    assert (
        await webhook_db.fetchval(
            "SELECT count(*) FROM saga_log WHERE delivery_id = ANY($1::uuid[])",
            [old["completed"], old["ignored"], old["compensated"]],
        )
        == 0
    )
    assert metric("webhook_deliveries_purged_total") >= purged_before + 3
    await webhook_db.execute("DELETE FROM deliveries WHERE source = 'jobs'")


async def test_the_gauges_show_the_inbox_as_it_is(
    db: Database, webhook_db: asyncpg.Connection
) -> None:
    for state, age in (("pending", 3600), ("processing", 120), ("dead_letter", 60)):
        await _delivery(webhook_db, state, age)
    await InboxGauges(Inbox(db), interval=60).tick()
    counts = dict(
        await webhook_db.fetch(
            "SELECT state, count(*) FROM deliveries"
            " WHERE state IN ('pending', 'processing', 'dead_letter') GROUP BY state"
        )
    )
    for state in ("pending", "processing", "dead_letter"):
        assert metric("webhook_inbox_depth", state=state) == counts[state] > 0
    assert metric("webhook_inbox_lag_seconds") >= 3600
    assert metric("database_size_bytes", schema="webhook") > 0
    await webhook_db.execute("DELETE FROM deliveries WHERE source = 'jobs'")
