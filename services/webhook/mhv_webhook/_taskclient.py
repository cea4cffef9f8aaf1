"""The gateway's client of the task service: users and tasks, as a service acting for a user.

Every call carries the gateway's service token, the user it acts for (``x-mhv-on-behalf-of``),
the remaining deadline, and the trace context of the delivery being processed. Failures come
back as `TransientError` (retry later: the task service is down, slow or busy) or
`PermanentError` (retrying the same request cannot help), with the MHV code when there is one.
"""

from __future__ import annotations

import grpc
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common import context
from mhv_common.auth import ServiceCredentials
from mhv_common.client import Peer, service_channel
from mhv_common.edge import ON_BEHALF_OF_KEY
from mhv_common.errors import from_rpc_error

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


class TransientError(Exception):
    """The call may succeed later, unchanged."""


class PermanentError(Exception):
    """The call cannot succeed as it is.

    Attributes:
        code: The MHV code of the task service's answer, or "" when there was none.
    """

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def _fail(exc: aio.AioRpcError | BaseException) -> Exception:
    if not isinstance(exc, aio.AioRpcError):
        return TransientError(f"task service call interrupted ({type(exc).__name__})")
    mhv = from_rpc_error(exc)
    code = mhv.code if mhv else ""
    message = f"task service answered {exc.code().name}" + (f" [{code}]" if code else "")
    if exc.code() in _TRANSIENT:
        return TransientError(message)
    return PermanentError(message, code=code)


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

    def _options(self, acting_for: str | None = None) -> dict[str, object]:
        metadata = list(self._credentials.metadata())
        if acting_for:
            metadata.append((ON_BEHALF_OF_KEY, acting_for))
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
    def tasks(self) -> task_pb2_grpc.TaskServiceStub:
        """The TaskService stub."""
        assert self._tasks is not None, "open() first"
        return self._tasks

    @property
    def users(self) -> task_pb2_grpc.UserServiceStub:
        """The UserService stub."""
        assert self._users is not None, "open() first"
        return self._users

    async def ensure_user(self, username: str) -> str:
        """The id of the user called `username`, created if missing (safe to repeat)."""
        try:
            found = await self.users.GetUser(
                task_pb2.GetUserRequest(username=username), **self._options()
            )
            return str(found.id)
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _fail(exc) from None
        try:
            made = await self.users.CreateUser(
                task_pb2.CreateUserRequest(
                    username=username,
                    email=f"{username}@users.webhook.invalid",
                    display_name=username,
                ),
                **self._options(),
            )
            return str(made.id)
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise _fail(exc) from None
        # Another worker created the user between our two calls.
        try:
            found = await self.users.GetUser(
                task_pb2.GetUserRequest(username=username), **self._options()
            )
        except aio.AioRpcError as exc:
            raise _fail(exc) from None
        return str(found.id)

    async def create_task(
        self, *, request_id: str, title: str, description: str, repository: str, actor: str
    ) -> int:
        """Create a task; retries with the same `request_id` return the same task."""
        try:
            task = await self.tasks.CreateTask(
                task_pb2.CreateTaskRequest(
                    title=title,
                    description=description,
                    repository=repository,
                    request_id=request_id,
                ),
                **self._options(actor),
            )
        except aio.AioRpcError as exc:
            raise _fail(exc) from None
        return int(task.id)

    async def get_task(self, task_id: int) -> task_pb2.Task | None:
        """The task, or None when it was deleted."""
        try:
            task: task_pb2.Task = await self.tasks.GetTask(
                task_pb2.GetTaskRequest(id=task_id), **self._options()
            )
        except aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _fail(exc) from None
        return task

    async def call(self, method: str, request: object, *, actor: str) -> task_pb2.Task:
        """Call a TaskService mutation (UpdateTask, StartTask, ...) acting for `actor`."""
        try:
            task: task_pb2.Task = await getattr(self.tasks, method)(request, **self._options(actor))
        except aio.AioRpcError as exc:
            raise _fail(exc) from None
        return task
