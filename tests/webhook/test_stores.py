"""The stores: every method takes a keyword-only `timeout`, and its statements obey it."""

from __future__ import annotations

import datetime as dt
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from mhv_common.db import Database
from mhv_common.errors import DeadlineExceededError
from mhv_webhook._store_inbox import Inbox
from mhv_webhook._store_saga import Sagas, SagaStep
from tests.harness import Deployment

# Shorter than any round trip to the database: a statement given it cannot finish in time.
TINY = 1e-6
WORKER = "stores-test"


def _methods(cls: type) -> list[tuple[str, inspect.Signature]]:
    return [
        (name, inspect.signature(member))
        for name, member in vars(cls).items()
        if not name.startswith("_") and callable(member)
    ]


@pytest.mark.parametrize("cls", [Inbox, Sagas, SagaStep])
def test_every_store_method_takes_a_keyword_only_timeout(cls: type) -> None:
    methods = _methods(cls)
    assert methods
    for name, signature in methods:
        timeout = signature.parameters.get("timeout")
        assert timeout is not None, f"{cls.__name__}.{name} takes no timeout"
        assert timeout.kind is inspect.Parameter.KEYWORD_ONLY, f"{cls.__name__}.{name}"


@dataclass
class Stores:
    inbox: Inbox
    sagas: Sagas
    leased: uuid.UUID


@pytest.fixture(scope="module")
async def stores(deployment: Deployment) -> AsyncIterator[Stores]:
    db = Database(deployment.role_url("webhook"), name="webhook", min_size=1, max_size=2)
    await db.open()
    leased = uuid.uuid4()
    conn = await asyncpg.connect(deployment.role_url("webhook"))
    try:
        # A delivery this test's worker holds the lease of, with its saga log row.
        await conn.execute(
            "INSERT INTO deliveries (id, source, delivery_id, event, action, body, state,"
            " leased_by, leased_until)"
            " VALUES ($1, 'stores', $2, 'issues', 'opened', '\\x7b7d', 'processing', $3,"
            " now() + interval '1 hour')",
            leased,
            str(leased),
            WORKER,
        )
        await conn.execute(
            "INSERT INTO saga_log (delivery_id, idempotency_key) VALUES ($1, $2)",
            leased,
            f"webhook:{leased}",
        )
        yield Stores(Inbox(db), Sagas(db), leased)
    finally:
        await conn.execute("DELETE FROM deliveries WHERE id = $1", leased)
        await conn.close()
        await db.close()


Call = Callable[[Stores], Awaitable[object]]


async def _in_step(s: Stores, act: Callable[[SagaStep], Awaitable[object]]) -> None:
    async with s.sagas.step(s.leased, worker=WORKER, lease_seconds=60, timeout=5) as step:
        await act(step)


CALLS: dict[str, Call] = {
    "Inbox.accept": lambda s: s.inbox.accept(
        source="stores",
        dedup_keys=[("delivery_id", str(uuid.uuid4()))],
        delivery_id="d",
        event="e",
        action="a",
        headers={},
        body=b"{}",
        content_type="application/json",
        traceparent=None,
        tracestate=None,
        timeout=TINY,
    ),
    "Inbox.known": lambda s: s.inbox.known(
        source="stores", dedup_keys=[("delivery_id", "d")], timeout=TINY
    ),
    "Inbox.purge_dedup": lambda s: s.inbox.purge_dedup(retention_seconds=1e9, timeout=TINY),
    "Inbox.list_deliveries": lambda s: s.inbox.list_deliveries(
        source="stores", state=None, after=None, limit=1, timeout=TINY
    ),
    "Inbox.get_delivery": lambda s: s.inbox.get_delivery(s.leased, timeout=TINY),
    "Inbox.requeue_dead_letter": lambda s: s.inbox.requeue_dead_letter(
        uuid.uuid4(), audit=lambda _: pytest.fail("no delivery to audit"), timeout=TINY
    ),
    "Inbox.purge_delivered_events": lambda s: s.inbox.purge_delivered_events(
        older_than=dt.timedelta(days=1), timeout=TINY
    ),
    "Inbox.stats": lambda s: s.inbox.stats(timeout=TINY),
    "Sagas.claim": lambda s: s.sagas.claim(worker=WORKER, lease_seconds=1, timeout=TINY),
    "Sagas.step": lambda s: _enter(
        s.sagas.step(s.leased, worker=WORKER, lease_seconds=60, timeout=TINY)
    ),
    "Sagas.saga": lambda s: s.sagas.saga(s.leased, timeout=TINY),
    "Sagas.release_claim": lambda s: s.sagas.release_claim(
        s.leased, "stores", "none#1", timeout=TINY
    ),
    "Sagas.purge_finished": lambda s: s.sagas.purge_finished(retention_seconds=1e9, timeout=TINY),
    "Sagas.finish": lambda s: s.sagas.finish(
        s.leased, worker="nobody", state="completed", saga_state="completed", timeout=TINY
    ),
    "Sagas.reschedule": lambda s: s.sagas.reschedule(
        s.leased, worker="nobody", delay_seconds=0, dead=False, error="", timeout=TINY
    ),
    "SagaStep.record": lambda s: _in_step(s, lambda step: step.record("started", timeout=TINY)),
    "SagaStep.claim_issue": lambda s: _in_step(
        s, lambda step: step.claim_issue("stores", "none#1", timeout=TINY)
    ),
    "SagaStep.lock_link": lambda s: _in_step(
        s, lambda step: step.lock_link("stores", "none#1", timeout=TINY)
    ),
    "SagaStep.move_link": lambda s: _in_step(
        s, lambda step: step.move_link("stores", "none#1", "none#2", timeout=TINY)
    ),
    "SagaStep.mark_state": lambda s: _in_step(
        s, lambda step: step.mark_state("stores", "none#1", dt.datetime.now(dt.UTC), timeout=TINY)
    ),
    "SagaStep.link_task": lambda s: _in_step(
        s, lambda step: step.link_task("stores", "none#1", 1, timeout=TINY)
    ),
}


async def _enter(context: object) -> None:
    async with context:  # type: ignore[attr-defined]
        pass


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_statements_are_bounded_by_the_timeout_given(stores: Stores, name: str) -> None:
    with pytest.raises((TimeoutError, DeadlineExceededError)):
        await CALLS[name](stores)
