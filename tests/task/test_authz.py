"""Authorization: every RPC x every role x (own task / someone else's task)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common import context
from mhv_common.auth import Principal, Role
from mhv_common.errors import AuthenticationError, ValidationError
from mhv_task._authz import Actor, actor_for_change
from tests.harness import mhv_code, rpc_error
from tests.task.conftest import People, new_task

# Who may call what. "own" means: a member acting on a task it created.
ALLOW = "allow"
DENY = "deny"

TASK_READS = ("GetTask", "ListTasks", "SearchTasks")
TASK_CHANGES = (
    "UpdateTask",
    "AssignTask",
    "StartTask",
    "CompleteTask",
    "CancelTask",
    "BlockTask",
    "UnblockTask",
)
PRINCIPALS = ("admin", "member_own", "member_other", "viewer", "auditor", "service", "anonymous")


def expected(rpc: str, who: str) -> str:
    if who == "anonymous":
        return "unauthenticated"
    if who == "admin":
        return ALLOW
    if rpc in TASK_READS or rpc in ("GetUser", "ListUsers"):
        return DENY if who == "auditor" else ALLOW
    if rpc == "CreateTask":
        return ALLOW if who in ("member_own", "member_other", "service") else DENY
    if rpc in TASK_CHANGES:
        return ALLOW if who in ("member_own", "service") else DENY
    if rpc == "CreateUser":
        return ALLOW if who == "service" else DENY
    return DENY  # DeleteTask, DeactivateUser, DeleteUser: admin only


def metadata(people: People, who: str) -> tuple[tuple[str, str], ...]:
    return {
        "admin": people.admin.md(),
        "member_own": people.alice.md(),
        "member_other": people.bob.md(),
        "viewer": people.viewer.md(),
        "auditor": people.auditor.md(),
        "service": people.for_service(people.alice.id),
        "anonymous": (),
    }[who]


async def prepare(rpc: str, tasks: task_pb2_grpc.TaskServiceStub, people: People) -> Any:
    """A fresh target in the state the RPC needs, created by alice."""
    task = await new_task(tasks, people.alice, title=f"authz {rpc}")
    md = people.alice.md()
    if rpc == "CompleteTask":
        await tasks.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=md)
    if rpc == "UnblockTask":
        await tasks.BlockTask(task_pb2.BlockTaskRequest(id=task.id), metadata=md)
    return task


def call(
    rpc: str,
    task: task_pb2.Task,
    stubs: tuple[task_pb2_grpc.TaskServiceStub, task_pb2_grpc.UserServiceStub],
    people: People,
) -> Callable[..., Awaitable[Any]]:
    tasks, users = stubs
    name = f"authz{uuid.uuid4().hex[:10]}"
    requests: dict[str, tuple[Any, Any]] = {
        "CreateTask": (tasks.CreateTask, task_pb2.CreateTaskRequest(title="t", repository="demo")),
        "GetTask": (tasks.GetTask, task_pb2.GetTaskRequest(id=task.id)),
        "ListTasks": (tasks.ListTasks, task_pb2.ListTasksRequest(page_size=1)),
        "SearchTasks": (tasks.SearchTasks, task_pb2.SearchTasksRequest(query="authz")),
        "UpdateTask": (
            tasks.UpdateTask,
            task_pb2.UpdateTaskRequest(
                task=task_pb2.Task(id=task.id, title="changed"), update_mask={"paths": ["title"]}
            ),
        ),
        "DeleteTask": (tasks.DeleteTask, task_pb2.DeleteTaskRequest(id=task.id)),
        "AssignTask": (
            tasks.AssignTask,
            task_pb2.AssignTaskRequest(id=task.id, assigned_to=people.bob.id),
        ),
        "StartTask": (tasks.StartTask, task_pb2.StartTaskRequest(id=task.id)),
        "CompleteTask": (tasks.CompleteTask, task_pb2.CompleteTaskRequest(id=task.id)),
        "CancelTask": (tasks.CancelTask, task_pb2.CancelTaskRequest(id=task.id)),
        "BlockTask": (tasks.BlockTask, task_pb2.BlockTaskRequest(id=task.id)),
        "UnblockTask": (tasks.UnblockTask, task_pb2.UnblockTaskRequest(id=task.id)),
        "CreateUser": (
            users.CreateUser,
            task_pb2.CreateUserRequest(username=name, email=f"{name}@example.test"),
        ),
        "GetUser": (users.GetUser, task_pb2.GetUserRequest(id=people.alice.id)),
        "ListUsers": (users.ListUsers, task_pb2.ListUsersRequest(page_size=1)),
        "DeactivateUser": (
            users.DeactivateUser,
            task_pb2.DeactivateUserRequest(id="00000000-0000-0000-0000-000000000000"),
        ),
        "DeleteUser": (
            users.DeleteUser,
            task_pb2.DeleteUserRequest(id="00000000-0000-0000-0000-000000000000"),
        ),
    }
    method, request = requests[rpc]
    return lambda md: method(request, metadata=md)


ALL_RPCS = [m.name for m in task_pb2.DESCRIPTOR.services_by_name["TaskService"].methods] + [
    m.name for m in task_pb2.DESCRIPTOR.services_by_name["UserService"].methods
]


def test_matrix_covers_every_rpc() -> None:
    assert set(ALL_RPCS) == set(TASK_READS) | set(TASK_CHANGES) | {
        "CreateTask",
        "DeleteTask",
        "CreateUser",
        "GetUser",
        "ListUsers",
        "DeactivateUser",
        "DeleteUser",
    }


async def _state(db: asyncpg.Connection, task_id: int) -> tuple[object, ...]:
    """What a refused call must leave as it was: the task, the outbox, the users."""
    task = await db.fetchrow("SELECT * FROM task.tasks WHERE id = $1", task_id)
    outbox = await db.fetchval("SELECT coalesce(max(id), 0) FROM task.outbox")
    user_rows = await db.fetch("SELECT id, is_active, updated_at FROM task.users ORDER BY id")
    return (dict(task) if task else None, outbox, [tuple(r) for r in user_rows])


@pytest.mark.parametrize("rpc", ALL_RPCS)
async def test_every_rpc_for_every_principal(
    rpc: str,
    tasks: task_pb2_grpc.TaskServiceStub,
    users: task_pb2_grpc.UserServiceStub,
    people: People,
    db: asyncpg.Connection,
) -> None:
    for who in PRINCIPALS:
        task = await prepare(rpc, tasks, people)
        invoke = call(rpc, task, (tasks, users), people)
        want = expected(rpc, who)
        if want == ALLOW and rpc in ("DeactivateUser", "DeleteUser"):
            # Authorised, then NOT_FOUND: the target user does not exist.
            error = await rpc_error(invoke(metadata(people, who)))
            assert error.code() == grpc.StatusCode.NOT_FOUND, (rpc, who, error.details())
        elif want == ALLOW:
            await invoke(metadata(people, who))
        else:
            before = await _state(db, task.id)
            error = await rpc_error(invoke(metadata(people, who)))
            # Refused means nothing happened: the task, its events and the users unchanged.
            assert await _state(db, task.id) == before, (rpc, who)
            if want == "unauthenticated":
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (rpc, who)
                assert mhv_code(error) == "MHV-004"
            else:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (
                    rpc,
                    who,
                    error.details(),
                )
                assert mhv_code(error) == "MHV-005"


# --- who the actor is ---------------------------------------------------------------------------


def _acting(principal: Principal, **extra: str) -> Actor:
    request = context.RequestContext(request_id="r", method="/x", principal=principal, extra=extra)
    with context.bind(request):
        return actor_for_change()


def test_the_actor_is_a_canonical_user_id_and_nothing_else() -> None:
    user = uuid.uuid4()
    member = Principal(str(user), frozenset({Role.MEMBER}))
    assert _acting(member).user_id == user
    service = Principal("service:webhook", frozenset({Role.SERVICE}))
    assert _acting(service, on_behalf_of=str(user)).user_id == user
    for loose in (user.hex, f"{{{user}}}", "alice"):
        with pytest.raises(AuthenticationError):
            _acting(Principal(loose, frozenset({Role.MEMBER})))
        with pytest.raises(ValidationError) as refused:
            _acting(service, on_behalf_of=loose)
        assert [v.field for v in refused.value.violations] == ["x-mhv-on-behalf-of"]
