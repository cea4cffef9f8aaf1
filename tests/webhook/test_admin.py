"""WebhookAdminService over real gRPC against the gateway process: authorization for every role,
listing with filters and pages, inspection, and retry of dead-lettered deliveries."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf import json_format
from grpc import aio

from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.auth import Role
from mhv_common.errors import from_rpc_error
from tests.audit.support import audited, verify
from tests.audit.support import stub as audit_stub
from tests.conftest import Services
from tests.harness import Deployment, Keys, bearer, grpc_channel, make_person, metric, rpc_error
from tests.webhook.conftest import GatewayProcess

pytestmark = pytest.mark.slow

S = webhook_pb2.DeliveryState


@pytest.fixture
async def stub(gateway: GatewayProcess) -> AsyncIterator[webhook_pb2_grpc.WebhookAdminServiceStub]:
    async with aio.insecure_channel(gateway.process.target) as channel:
        yield webhook_pb2_grpc.WebhookAdminServiceStub(channel)


async def _insert(
    conn: asyncpg.Connection,
    source: str,
    *,
    state: str = "pending",
    received: dt.datetime,
    delivery_id: str | None = None,
) -> uuid.UUID:
    row_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO deliveries (id, source, delivery_id, event, action, body, state, attempts,"
        " last_error, received_at, updated_at)"
        " VALUES ($1, $2, $3, 'issues', 'opened', '\\x7b7d', $4, $5, $6, $7, $7)",
        row_id,
        source,
        delivery_id or str(uuid.uuid4()),
        state,
        5 if state == "dead_letter" else 0,
        "task service unavailable" if state == "dead_letter" else "",
        received,
    )
    return row_id


def _code(error: aio.AioRpcError) -> str:
    typed = from_rpc_error(error)
    assert typed is not None
    return typed.code


@pytest.mark.parametrize("role", [Role.MEMBER, Role.VIEWER, Role.AUDITOR, Role.SERVICE])
async def test_every_rpc_is_admin_only(
    stub: webhook_pb2_grpc.WebhookAdminServiceStub, keys: Keys, role: Role
) -> None:
    token = bearer(keys.token(role))
    calls = [
        stub.ListDeliveries(webhook_pb2.ListDeliveriesRequest(), metadata=token),
        stub.GetDelivery(webhook_pb2.GetDeliveryRequest(id=str(uuid.uuid4())), metadata=token),
        stub.RetryDelivery(webhook_pb2.RetryDeliveryRequest(id=str(uuid.uuid4())), metadata=token),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _code(error) == "MHV-005"


async def test_every_rpc_needs_a_token(stub: webhook_pb2_grpc.WebhookAdminServiceStub) -> None:
    for call in (
        stub.ListDeliveries(webhook_pb2.ListDeliveriesRequest()),
        stub.GetDelivery(webhook_pb2.GetDeliveryRequest(id=str(uuid.uuid4()))),
        stub.RetryDelivery(webhook_pb2.RetryDeliveryRequest(id=str(uuid.uuid4()))),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _code(error) == "MHV-004"


async def test_list_filters_newest_first_in_pages(
    stub: webhook_pb2_grpc.WebhookAdminServiceStub, keys: Keys, webhook_db: asyncpg.Connection
) -> None:
    source = f"adm_{uuid.uuid4().hex[:8]}"
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    ids = [
        await _insert(webhook_db, source, received=base + dt.timedelta(minutes=i)) for i in range(5)
    ]
    dead = await _insert(
        webhook_db, source, state="dead_letter", received=base - dt.timedelta(hours=1)
    )
    token = bearer(keys.token(Role.ADMIN))
    seen: list[str] = []
    request = webhook_pb2.ListDeliveriesRequest(
        source=source, state=S.DELIVERY_STATE_PENDING, page_size=2
    )
    pages = 0
    while True:
        reply = await stub.ListDeliveries(request, metadata=token)
        pages += 1
        assert len(reply.deliveries) <= 2
        seen += [d.id for d in reply.deliveries]
        assert all(
            d.state == S.DELIVERY_STATE_PENDING and d.source == source for d in reply.deliveries
        )
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert pages == 3
    assert seen == [str(i) for i in reversed(ids)]
    only_dead = await stub.ListDeliveries(
        webhook_pb2.ListDeliveriesRequest(source=source, state=S.DELIVERY_STATE_DEAD_LETTER),
        metadata=token,
    )
    assert [d.id for d in only_dead.deliveries] == [str(dead)]
    assert only_dead.deliveries[0].last_error == "task service unavailable"
    everything = await stub.ListDeliveries(
        webhook_pb2.ListDeliveriesRequest(source=source), metadata=token
    )
    assert len(everything.deliveries) == 6
    # A token belongs to the filters it was issued for; garbage is refused too.
    first = await stub.ListDeliveries(
        webhook_pb2.ListDeliveriesRequest(source=source, page_size=1), metadata=token
    )
    for bad in (
        webhook_pb2.ListDeliveriesRequest(source="github", page_token=first.next_page_token),
        webhook_pb2.ListDeliveriesRequest(source=source, page_token="not-a-token"),
    ):
        error = await rpc_error(stub.ListDeliveries(bad, metadata=token))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(error) == "MHV-011"
    error = await rpc_error(
        stub.ListDeliveries(webhook_pb2.ListDeliveriesRequest(page_size=-1), metadata=token)
    )
    assert (error.code(), _code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")


async def test_get_delivery_shows_saga_progress(
    stub: webhook_pb2_grpc.WebhookAdminServiceStub, keys: Keys, webhook_db: asyncpg.Connection
) -> None:
    token = bearer(keys.token(Role.ADMIN))
    row_id = await _insert(
        webhook_db, "github", received=dt.datetime.now(dt.UTC), delivery_id="gh-42"
    )
    await webhook_db.execute(
        "INSERT INTO saga_log (delivery_id, step, task_id, idempotency_key)"
        " VALUES ($1, 'task_applied', 42, $2)",
        row_id,
        f"webhook:{row_id}",
    )
    got = await stub.GetDelivery(webhook_pb2.GetDeliveryRequest(id=str(row_id)), metadata=token)
    assert (got.id, got.source, got.delivery_id, got.event, got.action) == (
        str(row_id),
        "github",
        "gh-42",
        "issues",
        "opened",
    )
    assert (got.saga_step, got.task_id, got.state) == ("task_applied", 42, S.DELIVERY_STATE_PENDING)
    assert got.receive_time.seconds > 0
    missing = await rpc_error(
        stub.GetDelivery(webhook_pb2.GetDeliveryRequest(id=str(uuid.uuid4())), metadata=token)
    )
    assert (missing.code(), _code(missing)) == (grpc.StatusCode.NOT_FOUND, "MHV-307")
    bad = await rpc_error(
        stub.GetDelivery(webhook_pb2.GetDeliveryRequest(id="42; DROP TABLE"), metadata=token)
    )
    assert (bad.code(), _code(bad)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")


async def test_retry_requeues_only_dead_letters_keeping_the_dedup_key(
    stub: webhook_pb2_grpc.WebhookAdminServiceStub, keys: Keys, webhook_db: asyncpg.Connection
) -> None:
    token = bearer(keys.token(Role.ADMIN))
    sender_id = f"dead-{uuid.uuid4()}"
    await webhook_db.execute(
        "INSERT INTO dedup (source, key_kind, key) VALUES ('github', 'delivery_id', $1)", sender_id
    )
    dead = await _insert(
        webhook_db,
        "github",
        state="dead_letter",
        received=dt.datetime.now(dt.UTC),
        delivery_id=sender_id,
    )
    await webhook_db.execute(
        "INSERT INTO saga_log (delivery_id, step, state, idempotency_key)"
        " VALUES ($1, 'user_ensured', 'failed', $2)",
        dead,
        f"webhook:{dead}",
    )
    retried = await stub.RetryDelivery(
        webhook_pb2.RetryDeliveryRequest(id=str(dead)), metadata=token
    )
    assert (retried.id, retried.delivery_id, retried.state, retried.attempts) == (
        str(dead),
        sender_id,
        S.DELIVERY_STATE_PENDING,
        0,
    )
    assert retried.saga_step == "user_ensured"
    # Same row, same dedup record, the saga resumes with its idempotency key.
    assert (
        await webhook_db.fetchval(
            "SELECT count(*) FROM deliveries WHERE delivery_id = $1", sender_id
        )
        == 1
    )
    assert await webhook_db.fetchval("SELECT count(*) FROM dedup WHERE key = $1", sender_id) == 1
    saga = await webhook_db.fetchrow(
        "SELECT state, idempotency_key FROM saga_log WHERE delivery_id = $1", dead
    )
    assert (saga["state"], saga["idempotency_key"]) == ("running", f"webhook:{dead}")
    # Now pending: not retryable again.
    again = await rpc_error(
        stub.RetryDelivery(webhook_pb2.RetryDeliveryRequest(id=str(dead)), metadata=token)
    )
    assert (again.code(), _code(again)) == (grpc.StatusCode.FAILED_PRECONDITION, "MHV-308")
    missing = await rpc_error(
        stub.RetryDelivery(webhook_pb2.RetryDeliveryRequest(id=str(uuid.uuid4())), metadata=token)
    )
    assert (missing.code(), _code(missing)) == (grpc.StatusCode.NOT_FOUND, "MHV-307")


async def test_a_retry_is_audited_once_as_the_operator_through_the_gateway_outbox(
    services: Services, keys: Keys, webhook_db: asyncpg.Connection, deployment: Deployment
) -> None:
    """RetryDelivery's change and its audit event commit together; the relay records it once."""
    operator = await make_person(deployment, "operator")
    dead = await _insert(
        webhook_db, "github", state="dead_letter", received=dt.datetime.now(dt.UTC)
    )
    # Free text of the delivery (here a last error quoting a token) never reaches the audit log.
    secret = f"ghp_{uuid.uuid4().hex}"
    await webhook_db.execute(
        "UPDATE deliveries SET last_error = $2 WHERE id = $1", dead, f"token={secret}"
    )
    token = bearer(keys.token(Role.ADMIN, subject=operator))
    delivered = await metric(services.webhook.metrics_port, "webhook_outbox_delivered_total")
    async with grpc_channel(services.webhook.target, services.ca_file) as channel:
        admin = webhook_pb2_grpc.WebhookAdminServiceStub(channel)
        await admin.RetryDelivery(webhook_pb2.RetryDeliveryRequest(id=str(dead)), metadata=token)
        refused = await rpc_error(
            admin.RetryDelivery(webhook_pb2.RetryDeliveryRequest(id=str(dead)), metadata=token)
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION  # not audited: no change
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        audit = audit_stub(channel)
        (event,) = await audited(
            audit,
            keys,
            webhook_db,
            outbox="outbox",
            subject_kind="delivery",
            subject_id=str(dead),
        )
        assert (event.event_type, event.user_id, event.task_id) == (
            "delivery_retried",
            operator,
            0,
        )
        details = json_format.MessageToDict(event.details)
        assert details["state"] == {"old": "dead_letter", "new": "pending"}
        assert (details["source"], details["attempts_before"]) == ("github", 5)
        assert secret not in json_format.MessageToJson(event)
        assert (await verify(audit, keys)).ok
    port = services.webhook.metrics_port
    assert await metric(port, "webhook_outbox_delivered_total") >= delivered + 1
