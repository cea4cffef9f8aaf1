"""UserService and the users' constraints (unique names, deactivation, RESTRICT on delete)."""

from __future__ import annotations

import uuid

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.json_format import MessageToJson

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from tests.audit.support import audited, verify
from tests.audit.support import stub as audit_stub
from tests.conftest import Services
from tests.harness import Keys, bearer, grpc_channel, mhv_code, rpc_error, violations
from tests.task.conftest import People, new_task


async def _user(users: task_pb2_grpc.UserServiceStub, people: People) -> task_pb2.User:
    name = f"u{uuid.uuid4().hex[:10]}"
    return await users.CreateUser(
        task_pb2.CreateUserRequest(username=name, email=f"{name}@example.test", display_name="U"),
        metadata=people.admin.md(),
    )


async def test_create_get_list(users: task_pb2_grpc.UserServiceStub, people: People) -> None:
    user = await _user(users, people)
    assert user.active
    by_id = await users.GetUser(task_pb2.GetUserRequest(id=user.id), metadata=people.viewer.md())
    by_name = await users.GetUser(
        task_pb2.GetUserRequest(username=user.username), metadata=people.viewer.md()
    )
    assert by_id == by_name == user
    names: list[str] = []
    token = ""
    while True:
        page = await users.ListUsers(
            task_pb2.ListUsersRequest(page_size=2, page_token=token), metadata=people.viewer.md()
        )
        names.extend(u.username for u in page.users)
        token = page.next_page_token
        if not token:
            break
    assert user.username in names
    assert names == sorted(names)


async def test_duplicates_and_bad_input(
    users: task_pb2_grpc.UserServiceStub, people: People
) -> None:
    user = await _user(users, people)
    again = await rpc_error(
        users.CreateUser(
            task_pb2.CreateUserRequest(username=user.username, email="other@example.test"),
            metadata=people.admin.md(),
        )
    )
    assert (again.code(), mhv_code(again)) == (grpc.StatusCode.ALREADY_EXISTS, "MHV-111")
    assert "username" in violations(again)
    bad = await rpc_error(
        users.CreateUser(
            task_pb2.CreateUserRequest(username="has space", email="nope"),
            metadata=people.admin.md(),
        )
    )
    assert set(violations(bad)) == {"username", "email"}
    missing = await rpc_error(
        users.GetUser(task_pb2.GetUserRequest(id=str(uuid.uuid4())), metadata=people.viewer.md())
    )
    assert (missing.code(), mhv_code(missing)) == (grpc.StatusCode.NOT_FOUND, "MHV-110")


async def test_deactivated_users_cannot_be_assigned_and_are_hidden_by_default(
    users: task_pb2_grpc.UserServiceStub, tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    user = await _user(users, people)
    off = await users.DeactivateUser(
        task_pb2.DeactivateUserRequest(id=user.id), metadata=people.admin.md()
    )
    assert not off.active
    task = await new_task(tasks, people.alice)
    error = await rpc_error(
        tasks.AssignTask(
            task_pb2.AssignTaskRequest(id=task.id, assigned_to=user.id), metadata=people.alice.md()
        )
    )
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "MHV-112")
    create = await rpc_error(new_task(tasks, people.alice, assigned_to=user.id))
    assert mhv_code(create) == "MHV-112"


async def test_delete_user_who_created_tasks_is_refused_clearly(
    users: task_pb2_grpc.UserServiceStub,
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    keys: object,
) -> None:
    error = await rpc_error(
        users.DeleteUser(task_pb2.DeleteUserRequest(id=people.alice.id), metadata=people.admin.md())
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mhv_code(error) == "MHV-113"
    assert "deactivate" in error.details().lower()
    assert "foreign key" not in error.details().lower()


async def test_delete_user_unassigns_their_tasks_with_events(
    users: task_pb2_grpc.UserServiceStub,
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    db: asyncpg.Connection,
) -> None:
    user = await _user(users, people)
    task = await new_task(tasks, people.alice, assigned_to=user.id)
    await users.DeleteUser(task_pb2.DeleteUserRequest(id=user.id), metadata=people.admin.md())
    after = await tasks.GetTask(task_pb2.GetTaskRequest(id=task.id), metadata=people.alice.md())
    assert after.assigned_to == ""
    events = await db.fetch(
        "SELECT event_type, user_id FROM task.outbox WHERE task_id = $1 ORDER BY id", task.id
    )
    assert [e["event_type"] for e in events] == ["task_created", "task_assigned"]
    assert str(events[1]["user_id"]) == people.admin.id
    gone = await rpc_error(
        users.GetUser(task_pb2.GetUserRequest(id=user.id), metadata=people.admin.md())
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_lookalike_names_with_a_trailing_newline_are_refused(
    users: task_pb2_grpc.UserServiceStub, people: People
) -> None:
    error = await rpc_error(
        users.CreateUser(
            task_pb2.CreateUserRequest(username="admin\n", email="lookalike@example.test"),
            metadata=people.admin.md(),
        )
    )
    assert set(violations(error)) == {"username"}


async def test_deactivated_or_unknown_users_lose_read_access(
    users: task_pb2_grpc.UserServiceStub,
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    keys: Keys,
) -> None:
    user = await _user(users, people)
    token = bearer(keys.token(Role.VIEWER, subject=user.id))
    await users.DeactivateUser(
        task_pb2.DeactivateUserRequest(id=user.id), metadata=people.admin.md()
    )
    error = await rpc_error(tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=token))
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.FAILED_PRECONDITION, "MHV-112")
    stranger = bearer(keys.token(Role.VIEWER, subject=str(uuid.uuid4())))
    error = await rpc_error(users.ListUsers(task_pb2.ListUsersRequest(), metadata=stranger))
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.UNAUTHENTICATED, "MHV-004")


async def test_each_user_operation_is_audited_once_with_actor_and_subject(
    users: task_pb2_grpc.UserServiceStub,
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    services: Services,
    keys: Keys,
    db: asyncpg.Connection,
) -> None:
    """Create, deactivate and delete reach the audit log through the outbox, once each."""
    name = f"u{uuid.uuid4().hex[:10]}"
    secret = f"sk-live-{uuid.uuid4().hex}"
    request = task_pb2.CreateUserRequest(
        username=name, email=f"{name}@example.test", display_name="U"
    )
    request.metadata.update({"api_key": secret, "team": "blue"})
    user = await users.CreateUser(request, metadata=people.admin.md())
    # A task assigned to them while active is unassigned when they are deleted.
    await new_task(tasks, people.alice, assigned_to=user.id)
    await users.DeactivateUser(
        task_pb2.DeactivateUserRequest(id=user.id), metadata=people.admin.md()
    )
    await users.DeleteUser(task_pb2.DeleteUserRequest(id=user.id), metadata=people.admin.md())
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        audit = audit_stub(channel)
        found = await audited(
            audit, keys, db, outbox="task.outbox", subject_kind="user", subject_id=user.id
        )
        assert [e.event_type for e in found] == ["user_deleted", "user_deactivated", "user_created"]
        for event in found:
            assert (event.subject_kind, event.subject_id, event.task_id) == ("user", user.id, 0)
            assert event.user_id == people.admin.id
            assert secret not in MessageToJson(event)
        deleted, deactivated, created = (json_format.MessageToDict(e.details) for e in found)
        assert created["username"] == name and created["metadata"].startswith("[REDACTED")
        assert deactivated == {"username": name, "was_active": True}
        assert deleted["active"] is False and deleted["tasks_unassigned"] == 1
        assert (await verify(audit, keys)).ok
    assert secret not in str(await db.fetch("SELECT details::text FROM task.outbox"))


async def test_a_refused_user_operation_leaves_no_audit_event(
    users: task_pb2_grpc.UserServiceStub, people: People, db: asyncpg.Connection
) -> None:
    user = await _user(users, people)
    taken = await rpc_error(
        users.CreateUser(
            task_pb2.CreateUserRequest(username=user.username, email="x@example.test"),
            metadata=people.admin.md(),
        )
    )
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    missing = str(uuid.uuid4())
    for call in (users.DeactivateUser, users.DeleteUser):
        request = (
            task_pb2.DeactivateUserRequest(id=missing)
            if call is users.DeactivateUser
            else task_pb2.DeleteUserRequest(id=missing)
        )
        error = await rpc_error(call(request, metadata=people.admin.md()))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    written = await db.fetch(
        "SELECT event_type, subject_id FROM task.outbox WHERE subject_kind = 'user'"
        " AND (subject_id = $1 OR details->>'username' = $2)",
        missing,
        user.username,
    )
    assert [(e["event_type"], e["subject_id"]) for e in written] == [("user_created", user.id)]
