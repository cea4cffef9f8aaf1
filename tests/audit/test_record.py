"""RecordEvents through real gRPC against the audit service process and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import json_format

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_common.auth import Role
from tests.audit.support import (
    TRACE_ID,
    as_role,
    event,
    events,
    list_all,
    metric,
    random_task_id,
    record,
    rpc_error,
    stub,
    verify,
    violations,
)
from tests.conftest import Services
from tests.harness import Keys, grpc_channel
from tests.loglines import has_record
from tests.waiting import wait_until


@pytest.fixture
async def client(services: Services) -> AsyncIterator[audit_pb2_grpc.AuditServiceStub]:
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        yield stub(channel)


def _seqs(found: list[audit_pb2.AuditEvent]) -> list[int]:
    return [int(e.details["seq"]) for e in found]


async def test_a_batch_is_stored_in_order_and_chained(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    reply = await record(client, keys, events(task_id, 5))
    assert (reply.recorded, reply.duplicates) == (5, 0)
    stored = await list_all(client, keys, task_id=task_id, order=audit_pb2.ORDER_OLDEST_FIRST)
    assert _seqs(stored) == [0, 1, 2, 3, 4]
    # One batch is one transaction under the head lock: consecutive ids, each linked to the last.
    assert [e.id for e in stored] == list(range(stored[0].id, stored[0].id + 5))
    for before, after in itertools.pairwise(stored):
        assert after.prev_hash == before.hash
    assert len({e.create_time.ToMicroseconds() for e in stored}) == 1


async def test_every_field_is_stored_as_sent(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    sent = event(
        task_id,
        "task_assigned",
        details={"assignee": "alice", "changes": {"priority": ["low", "high"]}, "count": 3},
        occur_time=dt.datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC),
        request_id="req-abc-123",
    )
    before = dt.datetime.now(dt.UTC)
    await record(client, keys, [sent])
    (stored,) = await list_all(client, keys, task_id=task_id)
    assert (stored.event_id, stored.task_id, stored.event_type, stored.user_id) == (
        sent.event_id,
        task_id,
        "task_assigned",
        sent.user_id,
    )
    assert json_format.MessageToDict(stored.details) == {
        "assignee": "alice",
        "changes": {"priority": ["low", "high"]},
        "count": 3.0,
    }
    assert stored.occur_time == sent.occur_time
    assert stored.request_id == "req-abc-123"
    # The trace id of the change's traceparent links webhook -> task -> audit.
    assert stored.trace_id == TRACE_ID
    created = stored.create_time.ToDatetime(dt.UTC)
    assert before - dt.timedelta(seconds=5) <= created <= dt.datetime.now(dt.UTC)
    assert len(stored.hash) == len(stored.prev_hash) == 64


async def test_nanoseconds_are_truncated_to_microseconds_and_traceparent_is_optional(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    sent = event(task_id, traceparent="", request_id="")
    sent.occur_time.nanos = 123_456_789
    await record(client, keys, [sent])
    (stored,) = await list_all(client, keys, task_id=task_id)
    assert stored.occur_time.nanos == 123_456_000
    assert (stored.trace_id, stored.request_id) == ("", "")


async def test_a_redelivered_batch_is_acknowledged_and_not_stored_twice(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, services: Services
) -> None:
    task_id = random_task_id()
    batch = events(task_id, 5)
    recorded_before = await metric(
        services.audit.metrics_port, "audit_events_recorded_total", {"result": "recorded"}
    )
    duplicates_before = await metric(
        services.audit.metrics_port, "audit_events_recorded_total", {"result": "duplicate"}
    )
    assert (await record(client, keys, batch)).recorded == 5
    again = await record(client, keys, batch)
    assert (again.recorded, again.duplicates) == (0, 5)
    assert _seqs(await list_all(client, keys, task_id=task_id)) == [4, 3, 2, 1, 0]
    assert (
        await metric(
            services.audit.metrics_port, "audit_events_recorded_total", {"result": "recorded"}
        )
        - recorded_before
        >= 5
    )
    assert (
        await metric(
            services.audit.metrics_port, "audit_events_recorded_total", {"result": "duplicate"}
        )
        - duplicates_before
        >= 5
    )


async def test_a_partly_redelivered_batch_stores_only_the_new_events_in_order(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    batch = events(task_id, 8)
    assert (await record(client, keys, batch[:5])).recorded == 5
    # The relay lost the acknowledgement of 3 and 4 and resends them with the next events.
    reply = await record(client, keys, batch[3:])
    assert (reply.recorded, reply.duplicates) == (3, 2)
    # And a redelivery of a middle slice alone.
    reply = await record(client, keys, batch[1:3])
    assert (reply.recorded, reply.duplicates) == (0, 2)
    stored = await list_all(client, keys, task_id=task_id, order=audit_pb2.ORDER_OLDEST_FIRST)
    assert _seqs(stored) == list(range(8))


async def test_an_event_repeated_within_a_batch_is_stored_once(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    first, second = events(task_id, 2)
    reply = await record(client, keys, [first, second, first])
    assert (reply.recorded, reply.duplicates) == (2, 1)
    assert len(await list_all(client, keys, task_id=task_id)) == 2


async def test_concurrent_identical_batches_store_each_event_once(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    batch = events(task_id, 20)
    replies = await asyncio.gather(*(record(client, keys, batch) for _ in range(6)))
    assert sum(r.recorded for r in replies) == 20
    assert sum(r.duplicates for r in replies) == 100
    stored = await list_all(client, keys, task_id=task_id, order=audit_pb2.ORDER_OLDEST_FIRST)
    assert _seqs(stored) == list(range(20))


async def test_concurrent_writers_keep_one_unbroken_chain_and_each_task_in_order(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    tasks = [random_task_id() for _ in range(8)]

    async def writer(task_id: int) -> None:
        batch = events(task_id, 30)
        for start in range(0, 30, 10):
            await record(client, keys, batch[start : start + 10])

    await asyncio.gather(*(writer(t) for t in tasks))
    for task_id in tasks:
        stored = await list_all(client, keys, task_id=task_id, order=audit_pb2.ORDER_OLDEST_FIRST)
        assert _seqs(stored) == list(range(30))
    result = await verify(client, keys)
    assert result.ok, result.first_break
    assert result.rows_checked >= 240


async def test_a_malformed_batch_is_refused_whole_with_every_violation(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    good = event(task_id)
    bad_ids = event(task_id, event_id="not-a-uuid", user_id="nobody")
    bad_kind = event(task_id, "task_exploded", traceparent="00-xyz-01")
    bad_kind.task_id = -4
    no_time = event(task_id)
    no_time.ClearField("occur_time")
    nan_details = event(task_id)
    nan_details.details["score"] = float("nan")
    nul_details = event(task_id, details={"title": "a\x00b"}, request_id="tab\there")
    error = await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(
                events=[good, bad_ids, bad_kind, no_time, nan_details, nul_details]
            ),
            metadata=as_role(keys, Role.SERVICE),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("[MHV-003]")
    fields = [field for field, _ in violations(error)]
    assert fields == [
        "events[1].event_id",
        "events[1].user_id",
        "events[2].task_id",
        "events[2].event_type",
        "events[2].traceparent",
        "events[3].occur_time",
        "events[4].details",
        "events[5].request_id",
        "events[5].details",
    ]
    # Nothing of the batch was written, not even its valid first event.
    assert await list_all(client, keys, task_id=task_id) == []


@pytest.mark.parametrize(("count", "reason"), [(0, "must not be empty"), (1001, "at most 1000")])
async def test_empty_or_oversized_batches_are_refused(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, count: int, reason: str
) -> None:
    task_id = random_task_id()
    error = await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[event(task_id) for _ in range(count)]),
            metadata=as_role(keys, Role.SERVICE),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    ((field, description),) = violations(error)
    assert field == "events" and reason in description
    assert await list_all(client, keys, task_id=task_id) == []


SECRETS = (
    "sk_live_51HzQ",
    "hunter2-pass",
    "ghp_tokenvalue",
    "Bearer eyJhbGciOi",
    "call me at 555-0100",
    "meta-secret-x",
)


async def test_details_are_redacted_before_storage_and_no_secret_reaches_a_log_line(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, services: Services
) -> None:
    task_id = random_task_id()
    logged_before = len(services.audit.logs())
    details = {
        "title": "Rotate the keys",
        "description": "call me at 555-0100",
        "metadata": {"note": "meta-secret-x"},
        "changes": {
            "config": {"api_key": "sk_live_51HzQ", "items": [{"db_password": "hunter2-pass"}]},
            "labels": ["ops", "security"],
        },
        "Authorization": "Bearer eyJhbGciOi",
        "nested": {"deeper": {"github_token": "ghp_tokenvalue", "kept": "visible"}},
    }
    sent = event(task_id, details=details)
    await record(client, keys, [sent])
    # A malformed batch carrying the same secrets takes the error path.
    broken = event(task_id, details=details, event_id="broken")
    await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[broken]), metadata=as_role(keys, Role.SERVICE)
        )
    )
    (stored,) = await list_all(client, keys, task_id=task_id)
    got = json_format.MessageToDict(stored.details)
    assert got == {
        "title": "Rotate the keys",
        "description": "[REDACTED (19 characters)]",
        "metadata": "[REDACTED (25 characters)]",
        "changes": {
            "config": {
                "api_key": "[REDACTED (13 characters)]",
                "items": [{"db_password": "[REDACTED (12 characters)]"}],
            },
            "labels": ["ops", "security"],
        },
        "Authorization": "[REDACTED (17 characters)]",
        "nested": {"deeper": {"github_token": "[REDACTED (14 characters)]", "kept": "visible"}},
    }
    text = json.dumps(got)
    assert not any(secret in text for secret in SECRETS)

    def both_calls_logged() -> bool:
        # The log captured these calls (so the check below can fail)...
        ours = services.audit.logs()[logged_before:]
        return has_record(ours, msg="audit events recorded") and has_record(
            ours, error_code="MHV-003"
        )

    # (a call's lines are written after its answer)
    await wait_until(both_calls_logged, what="both calls are logged")
    logs = services.audit.logs()
    # ...and none of the secrets.
    assert not [secret for secret in SECRETS if secret in logs]


async def test_database_size_is_exported(services: Services) -> None:
    size = await metric(services.audit.metrics_port, "database_size_bytes", {"schema": "audit"})
    assert size > 8192


async def test_an_event_id_in_another_letter_case_is_the_same_event(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    event_id = str(uuid.uuid4())
    await record(client, keys, [event(task_id, event_id=event_id.upper())])
    again = await record(client, keys, [event(task_id, event_id=event_id)])
    assert (again.recorded, again.duplicates) == (0, 1)
    (stored,) = await list_all(client, keys, task_id=task_id)
    assert stored.event_id == event_id


def _about(kind: str, subject_id: str, event_type: str, task_id: int = 0) -> audit_pb2.EventRecord:
    record = event(task_id, event_type)
    record.subject_kind = kind
    record.subject_id = subject_id
    return record


async def test_events_about_users_are_stored_with_their_subject_and_chained(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    task_id = random_task_id()
    user = str(uuid.uuid4())
    batch = [event(task_id), _about("user", user, "user_created"), event(task_id)]
    await record(client, keys, batch)
    (stored,) = await list_all(client, keys, subject_kind="user", subject_id=user)
    assert (stored.subject_kind, stored.subject_id, stored.task_id) == ("user", user, 0)
    assert stored.event_type == "user_created"
    for found in await list_all(client, keys, task_id=task_id):
        assert (found.subject_kind, found.subject_id) == ("task", "")
    assert (await verify(client, keys)).ok


async def test_an_event_must_name_its_subject_as_its_type_says(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    user = str(uuid.uuid4())
    batch = [
        _about("user", user, "user_created", task_id=7),  # a user event names no task
        _about("user", "", "user_deleted"),  # nor leaves its user out
        _about("task", user, "task_updated", task_id=random_task_id()),  # a task has no id here
        _about("user", user, "task_updated"),  # a task event about a user
        _about("planet", user, "user_created"),
    ]
    error = await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(events=batch), metadata=as_role(keys, Role.SERVICE)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in violations(error)] == [
        "events[0].task_id",
        "events[1].subject_id",
        "events[2].subject_id",
        "events[3].subject_kind",
        "events[4].subject_kind",
    ]
    assert await list_all(client, keys, subject_id=user) == []
