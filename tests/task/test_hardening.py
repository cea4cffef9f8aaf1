"""Inputs and callers that once slipped past the rules.

Each case here was found in review: a value PostgreSQL cannot store that came back as
INTERNAL, a removed administrator who could still manage users, a service whose request ids
for two people collided into one task.
"""

from __future__ import annotations

import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import MAX_PERSON_TOKEN_SECONDS, MAX_SERVICE_TOKEN_SECONDS, Role
from tests.harness import Deployment, Keys, bearer, mhv_code, rpc_error, violations
from tests.task.conftest import People, make_user, new_task


def _struct(value: dict[str, object]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


async def _admin(deployment: Deployment, keys: Keys) -> tuple[str, tuple[tuple[str, str], ...]]:
    user_id = await make_user(deployment, f"admin-{uuid.uuid4().hex[:8]}")
    return user_id, bearer(keys.token(Role.ADMIN, subject=user_id))


async def test_a_deactivated_administrator_cannot_manage_users(
    users: task_pb2_grpc.UserServiceStub, people: People, deployment: Deployment, keys: Keys
) -> None:
    admin_id, admin = await _admin(deployment, keys)
    victim = await make_user(deployment, f"victim-{uuid.uuid4().hex[:8]}")
    # While active, the administrator may; then another administrator deactivates them.
    await users.GetUser(task_pb2.GetUserRequest(id=victim), metadata=admin)
    await users.DeactivateUser(
        task_pb2.DeactivateUserRequest(id=admin_id), metadata=people.admin.md()
    )
    calls = {
        "CreateUser": users.CreateUser(
            task_pb2.CreateUserRequest(username=f"new-{uuid.uuid4().hex[:8]}", email="n@x.test"),
            metadata=admin,
        ),
        "DeactivateUser": users.DeactivateUser(
            task_pb2.DeactivateUserRequest(id=victim), metadata=admin
        ),
        "DeleteUser": users.DeleteUser(task_pb2.DeleteUserRequest(id=victim), metadata=admin),
    }
    for name, call in calls.items():
        error = await rpc_error(call)
        assert (error.code(), mhv_code(error)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "MHV-112",
        ), name
    still = await users.GetUser(task_pb2.GetUserRequest(id=victim), metadata=people.admin.md())
    assert still.active


async def test_an_administrator_token_without_a_user_cannot_manage_users(
    users: task_pb2_grpc.UserServiceStub, keys: Keys
) -> None:
    ghost = bearer(keys.token(Role.ADMIN, subject=str(uuid.uuid4())))
    error = await rpc_error(
        users.CreateUser(
            task_pb2.CreateUserRequest(username=f"g-{uuid.uuid4().hex[:8]}", email="g@x.test"),
            metadata=ghost,
        )
    )
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.UNAUTHENTICATED, "MHV-004")


async def test_a_services_request_ids_are_per_user_it_acts_for(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    request = task_pb2.CreateTaskRequest(
        title="From a webhook", repository="demo", request_id=f"delivery-{uuid.uuid4()}"
    )
    for_alice = await tasks.CreateTask(request, metadata=people.for_service(people.alice.id))
    for_bob = await tasks.CreateTask(request, metadata=people.for_service(people.bob.id))
    assert for_alice.id != for_bob.id
    assert (for_alice.created_by, for_bob.created_by) == (people.alice.id, people.bob.id)
    # Each is still idempotent for its own user.
    again = await tasks.CreateTask(request, metadata=people.for_service(people.bob.id))
    assert again.id == for_bob.id


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            task_pb2.CreateTaskRequest(
                title="t", repository="demo", metadata=_struct({"note": "a\x00b"})
            ),
            "metadata",
        ),
        (
            task_pb2.CreateTaskRequest(
                title="t", repository="demo", metadata=_struct({"k\x00": "v"})
            ),
            "metadata",
        ),
        (
            task_pb2.CreateTaskRequest(
                title="t", repository="demo", metadata=_struct({"ratio": float("nan")})
            ),
            "metadata",
        ),
        (
            task_pb2.CreateTaskRequest(title="t", repository="demo", request_id="id\x00"),
            "request_id",
        ),
        (
            task_pb2.CreateTaskRequest(
                title="t", repository="demo", deadline="9999-12-31T23:00:00-14:00"
            ),
            "deadline",
        ),
    ],
    ids=[
        "nul-in-metadata-value",
        "nul-in-metadata-key",
        "nan-in-metadata",
        "nul-in-request-id",
        "deadline-overflow",
    ],
)
async def test_create_refuses_values_the_database_cannot_store(
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    request_: task_pb2.CreateTaskRequest,
    field: str,
) -> None:
    error = await rpc_error(tasks.CreateTask(request_, metadata=people.alice.md()))
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    assert field in violations(error)


async def test_filters_and_lookups_with_nul_are_answered_not_crashed(
    tasks: task_pb2_grpc.TaskServiceStub, users: task_pb2_grpc.UserServiceStub, people: People
) -> None:
    md = people.alice.md()
    listing = await rpc_error(
        tasks.ListTasks(task_pb2.ListTasksRequest(repository="de\x00mo"), metadata=md)
    )
    assert (listing.code(), mhv_code(listing)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    search = await rpc_error(
        tasks.SearchTasks(
            task_pb2.SearchTasksRequest(query="flaky", repository="de\x00mo"), metadata=md
        )
    )
    assert (search.code(), mhv_code(search)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    lookup = await rpc_error(
        users.GetUser(task_pb2.GetUserRequest(username="al\x00ice"), metadata=md)
    )
    assert lookup.code() == grpc.StatusCode.NOT_FOUND
    email = await rpc_error(
        users.CreateUser(
            task_pb2.CreateUserRequest(username=f"e-{uuid.uuid4().hex[:8]}", email="a\x00@b.test"),
            metadata=people.admin.md(),
        )
    )
    assert (email.code(), mhv_code(email)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    assert "email" in violations(email)


async def test_update_refuses_a_deadline_out_of_range(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice)
    error = await rpc_error(
        tasks.UpdateTask(
            task_pb2.UpdateTaskRequest(
                task=task_pb2.Task(
                    id=task.id, etag=task.etag, deadline=timestamp_pb2.Timestamp(seconds=10**13)
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["deadline"]),
            ),
            metadata=people.alice.md(),
        )
    )
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    assert "task.deadline" in violations(error)


async def _in_progress(tasks: task_pb2_grpc.TaskServiceStub, people: People) -> task_pb2.Task:
    task = await new_task(tasks, people.alice)
    started: task_pb2.Task = await tasks.StartTask(
        task_pb2.StartTaskRequest(id=task.id, etag=task.etag), metadata=people.alice.md()
    )
    return started


async def test_quality_gate_text_is_cleaned_and_its_size_bounded(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    task = await _in_progress(tasks, people)
    too_many = task_pb2.QualityGateResult(
        passed=True, checks=[task_pb2.QualityCheck(name=f"c{i}", passed=True) for i in range(201)]
    )
    error = await rpc_error(
        tasks.CompleteTask(
            task_pb2.CompleteTaskRequest(id=task.id, etag=task.etag, quality_gate=too_many),
            metadata=people.alice.md(),
        )
    )
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    assert "quality_gate.checks" in violations(error)
    gate = task_pb2.QualityGateResult(
        passed=False, checks=[task_pb2.QualityCheck(name="lint\x00", detail="x\x00y")]
    )
    done = await tasks.CompleteTask(
        task_pb2.CompleteTaskRequest(id=task.id, etag=task.etag, quality_gate=gate),
        metadata=people.alice.md(),
    )
    assert done.status == task_pb2.TASK_STATUS_COMPLETED
    stored = await db.fetchval("SELECT quality_gate FROM task.tasks WHERE id = $1", done.id)
    assert "\\u0000" not in str(stored) and "lint" in str(stored)


async def test_cancelling_a_blocked_task_clears_its_blocked_reason(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice)
    blocked = await tasks.BlockTask(
        task_pb2.BlockTaskRequest(id=task.id, etag=task.etag, reason="waiting on review"),
        metadata=people.alice.md(),
    )
    cancelled = await tasks.CancelTask(
        task_pb2.CancelTaskRequest(id=task.id, etag=blocked.etag, reason="not needed"),
        metadata=people.alice.md(),
    )
    assert cancelled.status == task_pb2.TASK_STATUS_CANCELLED
    assert cancelled.blocked_reason == ""


async def test_an_update_that_changes_nothing_writes_nothing(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, db: asyncpg.Connection
) -> None:
    task = await new_task(tasks, people.alice)
    same = await tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, etag=task.etag, title=task.title),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        metadata=people.alice.md(),
    )
    # No new version: the caller's etag stays valid, and no audit event claims a change.
    assert same.etag == task.etag
    events = await db.fetch(
        "SELECT event_type FROM task.outbox WHERE task_id = $1 ORDER BY id", task.id
    )
    assert [e["event_type"] for e in events] == ["task_created"]
    changed = await tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, etag=same.etag, title=task.title + " (edited)"),
            update_mask=field_mask_pb2.FieldMask(paths=["title"]),
        ),
        metadata=people.alice.md(),
    )
    assert changed.etag != task.etag


@pytest.mark.parametrize(
    ("role", "ttl"),
    [
        (Role.ADMIN, 10 * 365 * 24 * 3600),
        (Role.MEMBER, MAX_PERSON_TOKEN_SECONDS + 60),
        (Role.SERVICE, MAX_SERVICE_TOKEN_SECONDS + 60),
    ],
    ids=["ten-year-admin", "member-over-a-day", "service-over-fifteen-minutes"],
)
async def test_a_validly_signed_token_living_too_long_is_refused(
    tasks: task_pb2_grpc.TaskServiceStub, people: People, keys: Keys, role: Role, ttl: int
) -> None:
    subject = "service:webhook" if role == Role.SERVICE else people.admin.id
    token = keys.token(role, subject=subject, ttl_seconds=ttl)
    error = await rpc_error(tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=bearer(token)))
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.UNAUTHENTICATED, "MHV-004")
    assert "lives longer than" in error.details()
    # The same principal with a token inside its kind's limit is served.
    fine = keys.token(role, subject=subject, ttl_seconds=min(ttl, 600))
    await tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=bearer(fine))


def _not_finite(value: float) -> struct_pb2.Struct:
    # Deep inside: a list within a nested object.
    return _struct({"outer": {"ratios": [1.5, value]}})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_numbers_in_any_struct_name_the_field(
    tasks: task_pb2_grpc.TaskServiceStub,
    users: task_pb2_grpc.UserServiceStub,
    people: People,
    value: float,
) -> None:
    task = await new_task(tasks, people.alice)
    update = tasks.UpdateTask(
        task_pb2.UpdateTaskRequest(
            task=task_pb2.Task(id=task.id, metadata=_not_finite(value)),
            update_mask=field_mask_pb2.FieldMask(paths=["metadata"]),
        ),
        metadata=people.alice.md(),
    )
    create_user = users.CreateUser(
        task_pb2.CreateUserRequest(
            username=f"nf-{uuid.uuid4().hex[:8]}", email="nf@x.test", metadata=_not_finite(value)
        ),
        metadata=people.admin.md(),
    )
    for call, field in ((update, "task.metadata"), (create_user, "metadata")):
        error = await rpc_error(call)
        assert (error.code(), mhv_code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
        assert "finite" in violations(error).get(field, ""), violations(error)


async def test_a_caller_without_rights_is_denied_whatever_the_body_holds(
    tasks: task_pb2_grpc.TaskServiceStub,
    users: task_pb2_grpc.UserServiceStub,
    people: People,
) -> None:
    # Alice's task; Bob is a member who neither created it nor is assigned to it.
    task = await new_task(tasks, people.alice, metadata=_struct({"kept": 1}))
    nan = _not_finite(float("nan"))
    calls = {
        "UpdateTask": tasks.UpdateTask(
            task_pb2.UpdateTaskRequest(
                task=task_pb2.Task(id=task.id, title="x" * 500, metadata=nan),
                update_mask=field_mask_pb2.FieldMask(paths=["metadata", "title", "no_such"]),
            ),
            metadata=people.bob.md(),
        ),
        "AssignTask": tasks.AssignTask(
            task_pb2.AssignTaskRequest(id=task.id, assigned_to="not-a-uuid"),
            metadata=people.bob.md(),
        ),
        "BlockTask": tasks.BlockTask(
            task_pb2.BlockTaskRequest(id=task.id, reason="r" * 10_000), metadata=people.bob.md()
        ),
        "CompleteTask": tasks.CompleteTask(
            task_pb2.CompleteTaskRequest(
                id=task.id,
                quality_gate=task_pb2.QualityGateResult(
                    checks=[task_pb2.QualityCheck(name="n" * 10_000)]
                ),
            ),
            metadata=people.bob.md(),
        ),
        "CreateTask (viewer)": tasks.CreateTask(
            task_pb2.CreateTaskRequest(title="", repository="nowhere", metadata=nan),
            metadata=people.viewer.md(),
        ),
        "CreateUser (member)": users.CreateUser(
            task_pb2.CreateUserRequest(username="", email="bad", metadata=nan),
            metadata=people.alice.md(),
        ),
    }
    for name, call in calls.items():
        error = await rpc_error(call)
        assert (error.code(), mhv_code(error)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "MHV-005",
        ), name
    unchanged = await tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.bob.md())
    assert unchanged.etag == task.etag
