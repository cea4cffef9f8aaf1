"""The outbox: exactly one event per committed mutation, none for a refused or rolled-back one."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import grpc
from google.protobuf import field_mask_pb2
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from tests.harness import Deployment, mhv_code, rpc_error
from tests.task.conftest import People, new_task


async def _events(db: asyncpg.Connection, task_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT event_type, user_id, details, request_id, traceparent FROM task.outbox"
        " WHERE task_id = $1 ORDER BY id",
        task_id,
    )


async def test_one_event_per_committed_mutation(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    md = people.alice.md()
    task = await new_task(
        tasks, people.alice, description="secret roadmap", priority=task_pb2.PRIORITY_HIGH
    )
    await tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, title="Renamed"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        metadata=md,
    )
    # Refused changes in between must leave nothing behind.
    await rpc_error(tasks.CompleteTask(task_pb2.CompleteTaskRequest(id=task.id), metadata=md))
    await rpc_error(
        tasks.StartTask(task_pb2.StartTaskRequest(id=task.id, etag="stale"), metadata=md)
    )
    await rpc_error(
        tasks.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=people.bob.md())
    )
    await tasks.AssignTask(
        task_pb2.AssignTaskRequest(id=task.id, assigned_to=people.bob.id), metadata=md
    )
    await tasks.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=md)
    await tasks.BlockTask(task_pb2.BlockTaskRequest(id=task.id, reason="api_key=abc"), metadata=md)
    await tasks.UnblockTask(task_pb2.UnblockTaskRequest(id=task.id), metadata=md)
    await tasks.CompleteTask(
        task_pb2.CompleteTaskRequest(
            id=task.id,
            quality_gate=task_pb2.QualityGateResult(
                passed=True, checks=[task_pb2.QualityCheck(name="ci")]
            ),
        ),
        metadata=md,
    )
    events = await _events(db, task.id)
    assert [e["event_type"] for e in events] == [
        "task_created",
        "task_updated",
        "task_assigned",
        "task_started",
        "task_blocked",
        "task_unblocked",
        "task_completed",
    ]
    assert {str(e["user_id"]) for e in events} == {people.alice.id}
    created = json.loads(events[0]["details"])
    assert created["description"] == "[REDACTED (14 characters)]"
    assert created["priority"] == "high"
    assert json.loads(events[1]["details"]) == {"title": {"old": "A task", "new": "Renamed"}}
    completed = json.loads(events[-1]["details"])
    assert (completed["quality_gate_passed"], completed["checks_run"]) == (True, 1)
    assert all(len(e["request_id"]) >= 16 for e in events)
    assert all(e["traceparent"].startswith("00-") for e in events)


async def test_service_actor_is_the_named_user(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    task = await tasks.CreateTask(
        task_pb2.CreateTaskRequest(title="From a webhook", repository="demo"),
        metadata=people.for_service(people.bob.id),
    )
    assert task.created_by == people.bob.id
    events = await _events(db, task.id)
    assert str(events[0]["user_id"]) == people.bob.id
    nobody = await rpc_error(
        tasks.CreateTask(
            task_pb2.CreateTaskRequest(title="No actor", repository="demo"),
            metadata=people.service.md(),
        )
    )
    assert mhv_code(nobody) == "MHV-003"


async def test_deadline_on_a_locked_task_rolls_back_everything(
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    db: asyncpg.Connection,
    deployment: Deployment,
) -> None:
    task = await new_task(tasks, people.alice)
    holder = await asyncpg.connect(deployment.admin_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM task.tasks WHERE id = $1 FOR UPDATE", task.id)
        error = await rpc_error(
            tasks.StartTask(
                task_pb2.StartTaskRequest(id=task.id), metadata=people.alice.md(), timeout=0.5
            )
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await tx.rollback()
    finally:
        await holder.close()
    await asyncio.sleep(0.2)
    after = await tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.alice.md())
    assert after.status == task_pb2.TASK_STATUS_PENDING
    assert after.etag == task.etag
    assert [e["event_type"] for e in await _events(db, task.id)] == ["task_created"]
    # The service recovered: the same call now succeeds.
    started = await tasks.StartTask(
        task_pb2.StartTaskRequest(id=task.id), metadata=people.alice.md()
    )
    assert started.status == task_pb2.TASK_STATUS_IN_PROGRESS


async def test_many_concurrent_mutations_each_leave_exactly_one_event(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    made = await asyncio.gather(*(new_task(tasks, people.alice, title=f"c{i}") for i in range(30)))
    results = await asyncio.gather(
        *(
            tasks.StartTask(task_pb2.StartTaskRequest(id=t.id), metadata=people.alice.md())
            for t in made
            for _ in range(3)
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, task_pb2.Task)]
    assert len(ok) == 30  # each task started once; the two duplicates were refused...
    refused = [r for r in results if not isinstance(r, task_pb2.Task)]
    # ...as what they are, a start of a started task, not by any failure at all.
    assert [
        (r.code(), mhv_code(r)) if isinstance(r, aio.AioRpcError) else repr(r) for r in refused
    ] == [(grpc.StatusCode.FAILED_PRECONDITION, "MHV-106")] * 60
    rows = await db.fetch(
        "SELECT task_id, count(*) AS n FROM task.outbox WHERE task_id = ANY($1::bigint[])"
        " AND event_type = 'task_started' GROUP BY task_id",
        [t.id for t in made],
    )
    assert sorted(r["n"] for r in rows) == [1] * 30
