"""ListAuditEvents: filters, order, page tokens that hold while rows are appended."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_common.auth import Role
from tests.audit.support import (
    as_role,
    event,
    events,
    list_all,
    random_task_id,
    record,
    rpc_error,
    stub,
    violations,
)
from tests.conftest import Services
from tests.harness import Keys, grpc_channel

OLDEST = audit_pb2.ORDER_OLDEST_FIRST
NEWEST = audit_pb2.ORDER_NEWEST_FIRST


@pytest.fixture
async def client(services: Services) -> AsyncIterator[audit_pb2_grpc.AuditServiceStub]:
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        yield stub(channel)


async def _page(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, **request: object
) -> audit_pb2.ListAuditEventsResponse:
    reply: audit_pb2.ListAuditEventsResponse = await client.ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(**request),  # type: ignore[arg-type]
        metadata=as_role(keys, Role.AUDITOR),
        timeout=10,
    )
    return reply


def _seqs(found: list[audit_pb2.AuditEvent]) -> list[int]:
    return [int(e.details["seq"]) for e in found]


async def test_filters_by_task_user_and_type_newest_first_by_default(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    kinds = ["task_created", "task_assigned", "task_started", "task_completed"]
    batch = [
        event(task_id, kinds[n % 4], user_id=alice if n % 2 else bob, details={"seq": n})
        for n in range(8)
    ]
    await record(client, keys, batch)
    await record(client, keys, events(random_task_id(), 3))  # another task's events
    assert _seqs(await list_all(client, keys, task_id=task_id)) == [7, 6, 5, 4, 3, 2, 1, 0]
    assert _seqs(await list_all(client, keys, task_id=task_id, order=OLDEST)) == list(range(8))
    assert _seqs(await list_all(client, keys, task_id=task_id, user_id=alice)) == [7, 5, 3, 1]
    assert _seqs(await list_all(client, keys, user_id=bob.upper())) == [6, 4, 2, 0]
    assert _seqs(
        await list_all(client, keys, task_id=task_id, event_type="task_assigned", order=OLDEST)
    ) == [1, 5]
    first = await _page(client, keys, event_type="task_completed", page_size=20)
    assert first.events and {e.event_type for e in first.events} == {"task_completed"}


async def test_time_range_is_start_inclusive_end_exclusive_on_the_stored_time(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    await record(client, keys, [event(task_id, details={"seq": 0})])
    await asyncio.sleep(0.01)
    await record(client, keys, [event(task_id, details={"seq": 1})])
    await asyncio.sleep(0.01)
    await record(client, keys, [event(task_id, details={"seq": 2})])
    stored = await list_all(client, keys, task_id=task_id, order=OLDEST)
    middle = stored[1].create_time
    assert _seqs(await list_all(client, keys, task_id=task_id, start_time=middle)) == [2, 1]
    assert _seqs(await list_all(client, keys, task_id=task_id, end_time=middle)) == [0]
    assert _seqs(
        await list_all(
            client, keys, task_id=task_id, start_time=middle, end_time=stored[2].create_time
        )
    ) == [1]


async def test_newest_first_pages_neither_repeat_nor_skip_while_rows_are_appended(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    batch = events(task_id, 8)
    await record(client, keys, batch[:5])
    first = await _page(client, keys, task_id=task_id, page_size=2)
    assert _seqs(list(first.events)) == [4, 3] and first.next_page_token
    await record(client, keys, batch[5:])  # appended between pages
    second = await _page(
        client, keys, task_id=task_id, page_size=2, page_token=first.next_page_token
    )
    assert _seqs(list(second.events)) == [2, 1]
    # page_size may change from page to page.
    third = await _page(
        client, keys, task_id=task_id, page_size=10, page_token=second.next_page_token
    )
    assert _seqs(list(third.events)) == [0] and not third.next_page_token
    assert _seqs(await list_all(client, keys, task_id=task_id))[:3] == [7, 6, 5]


async def test_oldest_first_pages_reach_rows_appended_meanwhile(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    batch = events(task_id, 6)
    await record(client, keys, batch[:4])
    first = await _page(client, keys, task_id=task_id, page_size=3, order=OLDEST)
    assert _seqs(list(first.events)) == [0, 1, 2]
    await record(client, keys, batch[4:])
    second = await _page(
        client, keys, task_id=task_id, page_size=3, order=OLDEST, page_token=first.next_page_token
    )
    assert _seqs(list(second.events)) == [3, 4, 5] and not second.next_page_token


async def test_default_page_size_is_50(client: audit_pb2_grpc.AuditServiceStub, keys: Keys) -> None:
    task_id = random_task_id()
    await record(client, keys, events(task_id, 51))
    first = await _page(client, keys, task_id=task_id)
    assert len(first.events) == 50 and first.next_page_token
    second = await _page(client, keys, task_id=task_id, page_token=first.next_page_token)
    assert _seqs(list(second.events)) == [0] and not second.next_page_token


@pytest.mark.parametrize(
    "changed",
    [
        {"task_id": 1},
        {"user_id": str(uuid.uuid4())},
        {"event_type": "task_created"},
        {"order": OLDEST},
        {"start_time": timestamp_pb2.Timestamp(seconds=1)},
        {"end_time": timestamp_pb2.Timestamp(seconds=4_000_000_000)},
    ],
    ids=["task", "user", "type", "order", "start", "end"],
)
async def test_a_token_sent_with_other_filters_is_refused_mhv011(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, changed: dict[str, object]
) -> None:
    task_id = random_task_id()
    await record(client, keys, events(task_id, 3))
    first = await _page(client, keys, task_id=task_id, page_size=1)
    request = {"task_id": task_id, "page_size": 1, **changed}
    error = await rpc_error(_page(client, keys, page_token=first.next_page_token, **request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("[MHV-011]")
    assert [field for field, _ in violations(error)] == ["page_token"]


@pytest.mark.parametrize("token", ["garbage", "AQID", "x" * 34, "=" * 8, "AAAA" * 9, "é"])
async def test_a_token_not_issued_here_is_refused_mhv011(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, token: str
) -> None:
    error = await rpc_error(_page(client, keys, task_id=1, page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("[MHV-011]")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"user_id": "alice"}, "user_id"),
        ({"event_type": "task_exploded"}, "event_type"),
        ({"task_id": -5}, "task_id"),
        (
            {
                "start_time": timestamp_pb2.Timestamp(seconds=200),
                "end_time": timestamp_pb2.Timestamp(seconds=100),
            },
            "end_time",
        ),
        ({"start_time": timestamp_pb2.Timestamp(seconds=10**12)}, "start_time"),
        ({"order": 7}, "order"),
    ],
)
async def test_malformed_filters_are_refused_mhv003(
    client: audit_pb2_grpc.AuditServiceStub,
    keys: Keys,
    request_fields: dict[str, object],
    field: str,
) -> None:
    error = await rpc_error(_page(client, keys, **request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("[MHV-003]")
    assert [f for f, _ in violations(error)] == [field]
