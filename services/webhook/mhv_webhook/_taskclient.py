"""The gateway's client of the task service: users and tasks, as a service acting for a user.

Every call carries the gateway's service token, the user it acts for (``x-mhv-on-behalf-of``),
the remaining deadline, and the trace context of the delivery being processed. The methods
take and return plain Python values (ids, `TaskStatus`, `TaskSnapshot`, `QualityGate`);
protobuf stays in this module. Failures come back as `TransientError` (retry later: the task
service is down, slow or busy) or `PermanentError` (retrying the same request cannot help),
each carrying the typed `MahavishnuError` the task service answered with, when it answered
with one.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common import context
from mhv_common.auth import ServiceCredentials
from mhv_common.client import Peer, service_channel
from mhv_common.edge import ON_BEHALF_OF_KEY, TRANSIENT_STATUSES
from mhv_common.errors import MahavishnuError, from_rpc_error
from mhv_common.ids import uuid_or_none
from mhv_common.structs import plain_struct
from mhv_webhook._changes import QualityGate

T = TypeVar("T")


class TaskStatus(enum.StrEnum):
    """Where a task is in its lifecycle, as the task service reports it."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    BLOCKED = "blocked"
    COMPLETED = "completed"
    CANCELLED = "cancelled"

    @property
    def closed(self) -> bool:
        """Whether the task has ended (completed or cancelled)."""
        return self in (TaskStatus.COMPLETED, TaskStatus.CANCELLED)


_STATUS = {
    task_pb2.TASK_STATUS_PENDING: TaskStatus.PENDING,
    task_pb2.TASK_STATUS_IN_PROGRESS: TaskStatus.IN_PROGRESS,
    task_pb2.TASK_STATUS_BLOCKED: TaskStatus.BLOCKED,
    task_pb2.TASK_STATUS_COMPLETED: TaskStatus.COMPLETED,
    task_pb2.TASK_STATUS_CANCELLED: TaskStatus.CANCELLED,
}


_PRIORITY = {
    "low": task_pb2.PRIORITY_LOW,
    "medium": task_pb2.PRIORITY_MEDIUM,
    "high": task_pb2.PRIORITY_HIGH,
    "critical": task_pb2.PRIORITY_CRITICAL,
}
_PRIORITY_NAME = {number: name for name, number in _PRIORITY.items()}
# The fields `update_task` may change.
UPDATABLE = ("title", "description", "priority", "deadline", "metadata", "repository")


@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    """A task as the task service reports it, with what the saga compares and sends back.

    Attributes:
        id: The task id.
        status: Where it is in its lifecycle.
        title: Its title.
        description: Its description ("" for none).
        repository: Its repository.
        priority: ``low``, ``medium``, ``high`` or ``critical``.
        metadata: Its metadata, as plain JSON values.
        assigned_to: Its assignee's user id, or None.
        etag: The version read; an update sent with it fails if the task changed since.
    """

    id: int
    status: TaskStatus
    title: str
    description: str
    repository: str
    priority: str
    metadata: dict[str, Any]
    assigned_to: uuid.UUID | None
    etag: str


class TaskServiceError(Exception):
    """A call to the task service failed.

    Attributes:
        error: The typed error the task service answered with (e.g. `UserInactiveError`), or
            None when there was no Mahavishnu answer (a transport failure).
    """

    def __init__(self, message: str, *, error: MahavishnuError | None = None) -> None:
        super().__init__(message)
        self.error = error


class TransientError(TaskServiceError):
    """The call may succeed later, unchanged."""


class PermanentError(TaskServiceError):
    """The call cannot succeed as it is."""


def _fail(exc: BaseException) -> TaskServiceError:
    if not isinstance(exc, aio.AioRpcError):
        return TransientError(f"task service call interrupted ({type(exc).__name__})")
    error = from_rpc_error(exc)
    message = f"task service answered {exc.code().name}" + (f" [{error.code}]" if error else "")
    if exc.code() in TRANSIENT_STATUSES:
        return TransientError(message, error=error)
    return PermanentError(message, error=error)


class TaskClient:
    """Calls to TaskService and UserService for the saga.

    Args:
        peer: Where the task service listens, and how to trust it.
        credentials: The gateway's own service token source.
        rpc_timeout: Upper bound on each call; the current deadline may be tighter.
    """

    def __init__(
        self,
        peer: Peer,
        credentials: ServiceCredentials,
        *,
        rpc_timeout: float = 5.0,
    ) -> None:
        self._peer = peer
        self._credentials = credentials
        self._rpc_timeout = rpc_timeout
        self._channel: aio.Channel | None = None
        self._tasks: task_pb2_grpc.TaskServiceStub | None = None
        self._users: task_pb2_grpc.UserServiceStub | None = None

    async def open(self) -> None:
        """Create the channel (connections are made lazily)."""
        self._channel = service_channel(self._peer)
        self._tasks = task_pb2_grpc.TaskServiceStub(self._channel)
        self._users = task_pb2_grpc.UserServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            await self._channel.close()

    def _options(self, acting_for: uuid.UUID | None = None) -> dict[str, object]:
        metadata = list(self._credentials.metadata())
        if acting_for is not None:
            metadata.append((ON_BEHALF_OF_KEY, str(acting_for)))
        left = context.time_left(cap=self._rpc_timeout)
        # wait_for_ready: a call made while the channel reconnects waits (within its deadline)
        # instead of failing at once. The call gets 90% of the time left, so that its own
        # failure, not the step's deadline, is what the saga records.
        return {
            "metadata": metadata,
            "timeout": None if left is None else left * 0.9,
            "wait_for_ready": True,
        }

    @property
    def _task_stub(self) -> task_pb2_grpc.TaskServiceStub:
        assert self._tasks is not None, "open() first"
        return self._tasks

    @property
    def _user_stub(self) -> task_pb2_grpc.UserServiceStub:
        assert self._users is not None, "open() first"
        return self._users

    @staticmethod
    async def _call(call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except aio.AioRpcError as exc:
            raise _fail(exc) from None

    async def _get_user(self, username: str) -> uuid.UUID:
        found = await self._user_stub.GetUser(
            task_pb2.GetUserRequest(username=username), **self._options()
        )
        return uuid.UUID(found.id)

    async def ensure_user(self, username: str) -> uuid.UUID:
        """The id of the user called `username`, created if missing (safe to repeat)."""
        try:
            return await self._get_user(username)
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _fail(exc) from None
        try:
            made = await self._user_stub.CreateUser(
                task_pb2.CreateUserRequest(
                    username=username,
                    email=f"{username}@users.webhook.invalid",
                    display_name=username,
                ),
                **self._options(),
            )
            return uuid.UUID(made.id)
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _fail(exc) from None
        # Another worker created the user between our two calls.
        return await self._call(lambda: self._get_user(username))

    async def create_task(
        self,
        *,
        request_id: str,
        title: str,
        description: str,
        repository: str,
        actor: uuid.UUID,
        metadata: Mapping[str, Any] | None = None,
        priority: str | None = None,
        deadline: str | None = None,
    ) -> int:
        """Create a task; retries with the same `request_id` return the same task."""
        request = task_pb2.CreateTaskRequest(
            title=title,
            description=description,
            repository=repository,
            request_id=request_id,
            priority=_PRIORITY[priority] if priority else task_pb2.PRIORITY_UNSPECIFIED,
            deadline=deadline or "",
        )
        if metadata:
            request.metadata.update(dict(metadata))
        task = await self._call(lambda: self._task_stub.CreateTask(request, **self._options(actor)))
        return int(task.id)

    async def get_task(self, task_id: int) -> TaskSnapshot | None:
        """The task as it is now, or None when it was deleted."""
        try:
            task = await self._task_stub.GetTask(
                task_pb2.GetTaskRequest(id=task_id), **self._options()
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _fail(exc) from None
        status = _STATUS.get(task.status)
        if status is None:
            raise PermanentError(f"task service answered with unknown task status {task.status}")
        return TaskSnapshot(
            id=int(task.id),
            status=status,
            title=task.title,
            description=task.description,
            repository=task.repository,
            priority=_PRIORITY_NAME.get(task.priority, "medium"),
            metadata=plain_struct(task.metadata),
            assigned_to=uuid_or_none(task.assigned_to),
            etag=task.etag,
        )

    async def task_status(self, task_id: int) -> TaskStatus | None:
        """The task's status, or None when the task was deleted."""
        task = await self.get_task(task_id)
        return None if task is None else task.status

    async def update_task(
        self, task_id: int, changes: Mapping[str, Any], *, etag: str, actor: uuid.UUID
    ) -> None:
        """Change the named fields (`UPDATABLE`), if the task is still at version `etag`.

        A deadline is an aware `datetime.datetime`; metadata a JSON object.

        Raises:
            PermanentError: Carrying `TaskUpdateFailedError` when the task changed since
                `etag` was read (read it again and retry).
        """
        task = task_pb2.Task(id=task_id, etag=etag)
        for name, value in changes.items():
            if name not in UPDATABLE:
                raise ValueError(f"{name!r} cannot be updated")
            if name == "priority":
                task.priority = _PRIORITY[value]
            elif name == "deadline":
                task.deadline.FromDatetime(value)
            elif name == "metadata":
                task.metadata.update(dict(value))
            else:
                setattr(task, name, value)
        request = task_pb2.UpdateTaskRequest(task=task, update_mask={"paths": list(changes)})
        await self._call(lambda: self._task_stub.UpdateTask(request, **self._options(actor)))

    async def assign_task(
        self, task_id: int, assignee: uuid.UUID | None, *, actor: uuid.UUID
    ) -> None:
        """Assign the task to `assignee`, or unassign it (None)."""
        request = task_pb2.AssignTaskRequest(
            id=task_id, assigned_to=str(assignee) if assignee else ""
        )
        await self._call(lambda: self._task_stub.AssignTask(request, **self._options(actor)))

    async def start_task(self, task_id: int, *, actor: uuid.UUID) -> None:
        """Move a pending task to in progress."""
        request = task_pb2.StartTaskRequest(id=task_id)
        await self._call(lambda: self._task_stub.StartTask(request, **self._options(actor)))

    async def unblock_task(self, task_id: int, *, actor: uuid.UUID) -> None:
        """Move a blocked task back to where it was."""
        request = task_pb2.UnblockTaskRequest(id=task_id)
        await self._call(lambda: self._task_stub.UnblockTask(request, **self._options(actor)))

    async def complete_task(
        self, task_id: int, *, quality_gate: QualityGate | None, actor: uuid.UUID
    ) -> None:
        """Complete an in-progress task, recording `quality_gate` (None: no gate ran)."""
        gate = task_pb2.QualityGateResult(not_run=True)
        if quality_gate is not None:
            gate = task_pb2.QualityGateResult(
                passed=quality_gate.passed,
                checks_run=quality_gate.checks_run,
                checks=[
                    task_pb2.QualityCheck(name=name, passed=passed, detail=detail)
                    for name, passed, detail in quality_gate.checks
                ],
            )
        request = task_pb2.CompleteTaskRequest(id=task_id, quality_gate=gate)
        await self._call(lambda: self._task_stub.CompleteTask(request, **self._options(actor)))

    async def cancel_task(self, task_id: int, *, reason: str, actor: uuid.UUID) -> None:
        """Cancel an open task, giving `reason`."""
        request = task_pb2.CancelTaskRequest(id=task_id, reason=reason)
        await self._call(lambda: self._task_stub.CancelTask(request, **self._options(actor)))
