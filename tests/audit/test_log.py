"""The audit domain over separate connection pools: replicas taking turns on the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from mhv_audit import AuditLog, AuditStore, EventInput, ListFilter
from mhv_audit._chain import StoredRow
from mhv_common.db import Database
from tests.audit.support import events, random_task_id
from tests.harness import Deployment


def _inputs(task_id: int, count: int) -> list[EventInput]:
    out = []
    for record in events(task_id, count):
        out.append(
            EventInput(
                event_id=record.event_id,
                task_id=record.task_id,
                event_type=record.event_type,
                user_id=record.user_id,
                details={"seq": float(record.details["seq"])},
                details_error=None,
                occur_time=(record.occur_time.seconds, record.occur_time.nanos),
                request_id=record.request_id,
                traceparent=record.traceparent,
            )
        )
    return out


@pytest.fixture
async def replicas(deployment: Deployment) -> AsyncIterator[list[tuple[AuditLog, AuditStore]]]:
    pools = [Database(deployment.role_url("audit"), name=f"replica{n}") for n in range(3)]
    for pool in pools:
        await pool.open()
    yield [(AuditLog(AuditStore(pool)), AuditStore(pool)) for pool in pools]
    for pool in pools:
        await pool.close()


async def test_replicas_appending_the_same_batches_store_each_event_once_in_order(
    replicas: list[tuple[AuditLog, AuditStore]],
) -> None:
    task_id = random_task_id()
    batch = _inputs(task_id, 30)
    # As relays redeliver: each round every replica sends the same growing prefix at once, so
    # each round appends ten new events while the replicas race for the chain head.
    for end in (10, 20, 30):
        outcomes = await asyncio.gather(
            *(log.record(batch[:end]) for _ in range(2) for log, _store in replicas)
        )
        assert sum(o.recorded for o in outcomes) == 10
        assert sum(o.duplicates for o in outcomes) == 6 * end - 10
    store = replicas[0][1]
    rows = await store.list_events(
        ListFilter(task_id, None, None, None, None, newest_first=False), after_id=None, limit=100
    )
    assert [orjson.loads(StoredRow.of(r).details)["seq"] for r in rows] == list(range(30))
    result = await replicas[1][0].verify()
    assert result.ok, result.first_break
