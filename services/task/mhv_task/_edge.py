"""The gRPC edge of the task service: decode, call the domain, encode.

Nothing here decides anything. Authentication, role gates, deadlines, rate limits and error
mapping are the common interceptors' job (`mhv_common.interceptors`, policies in
`mhv_task.app`); decoding into validated requests is `mhv_task._edge_codec` with the models of
`mhv_task._models`; rules, authorization per task and the lifecycle are the domain's
(`mhv_task._tasks`, `mhv_task._users`). Errors are `MahavishnuError`s, mapped by the
interceptors.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import empty_pb2
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.config import RepositoryCatalog
from mhv_task import _edge_codec as codec
from mhv_task._lifecycle import Action
from mhv_task._metrics import RequestMetrics
from mhv_task._models import TaskTransitionRequest
from mhv_task._tasks import Tasks
from mhv_task._users import Users

_Transition = (
    task_pb2.StartTaskRequest
    | task_pb2.CompleteTaskRequest
    | task_pb2.CancelTaskRequest
    | task_pb2.BlockTaskRequest
    | task_pb2.UnblockTaskRequest
)


class TaskServicer(task_pb2_grpc.TaskServiceServicer):
    """mahavishnu.task.v1.TaskService over the domain's `Tasks`.

    Args:
        tasks: The domain.
        repositories: The configured repositories, to report an unknown one with the other
            problems of a CreateTask.
        metrics: The per-RPC metrics, recorded around decoding and the call.
    """

    def __init__(
        self, tasks: Tasks, *, repositories: RepositoryCatalog, metrics: RequestMetrics
    ) -> None:
        self._tasks = tasks
        self._repositories = repositories
        self._metrics = metrics

    async def CreateTask(
        self, request: task_pb2.CreateTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Create a task."""
        with self._metrics.creation(request.repository):
            task = await self._tasks.create(codec.create_task(request, self._repositories))
        return codec.task_message(task)

    async def GetTask(
        self, request: task_pb2.GetTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Read one task."""
        return codec.task_message(await self._tasks.get(codec.task_ref(request.id)))

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        """List tasks, newest first."""
        return codec.list_response(await self._tasks.list(codec.list_tasks(request)))

    async def UpdateTask(
        self, request: task_pb2.UpdateTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Change the fields named by the mask."""
        ref = codec.task_ref(request.task.id, request.task.etag)
        task = await self._tasks.update(ref, lambda: codec.update_task(request, self._repositories))
        return codec.task_message(task)

    async def DeleteTask(
        self, request: task_pb2.DeleteTaskRequest, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        """Delete a task."""
        await self._tasks.delete(codec.task_ref(request.id, request.etag))
        return empty_pb2.Empty()

    async def SearchTasks(
        self, request: task_pb2.SearchTasksRequest, context: aio.ServicerContext
    ) -> task_pb2.SearchTasksResponse:
        """Keyword, semantic or hybrid search."""
        # Resolved first (unspecified: hybrid when the server offers it), so that a refused
        # semantic or hybrid search counts in the search metrics like an answered one.
        mode = self._tasks.resolve_search_mode(codec.search_mode(request.mode))
        with self._metrics.search(mode):
            page = await self._tasks.search(codec.search_tasks(request))
        return codec.search_response(page)

    async def AssignTask(
        self, request: task_pb2.AssignTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Assign or unassign."""
        ref = codec.task_ref(request.id, request.etag)
        task = await self._tasks.assign(ref, lambda: codec.assign_task(request))
        return codec.task_message(task)

    async def StartTask(
        self, request: task_pb2.StartTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Move pending -> in_progress."""
        return await self._transition(Action.START, request, lambda: codec.transition(request))

    async def CompleteTask(
        self, request: task_pb2.CompleteTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Move in_progress -> completed, with the quality-gate result."""
        return await self._transition(
            Action.COMPLETE, request, lambda: codec.complete_task(request)
        )

    async def CancelTask(
        self, request: task_pb2.CancelTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Cancel an open task."""
        return await self._transition(Action.CANCEL, request, lambda: codec.transition(request))

    async def BlockTask(
        self, request: task_pb2.BlockTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Block a pending or in-progress task."""
        return await self._transition(Action.BLOCK, request, lambda: codec.transition(request))

    async def UnblockTask(
        self, request: task_pb2.UnblockTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Return a blocked task to its previous status."""
        return await self._transition(Action.UNBLOCK, request, lambda: codec.transition(request))

    async def _transition(
        self, action: Action, request: _Transition, decode: Callable[[], TaskTransitionRequest]
    ) -> task_pb2.Task:
        # Only the address is checked here; the domain decodes the rest once the caller may
        # change the task.
        ref = codec.task_ref(request.id, request.etag)
        return codec.task_message(await self._tasks.transition(action, ref, decode))


class UserServicer(task_pb2_grpc.UserServiceServicer):
    """mahavishnu.task.v1.UserService over the domain's `Users`."""

    def __init__(self, users: Users) -> None:
        self._users = users

    async def CreateUser(
        self, request: task_pb2.CreateUserRequest, context: aio.ServicerContext
    ) -> task_pb2.User:
        """Create a user."""
        return codec.user_message(await self._users.create(codec.create_user(request)))

    async def GetUser(
        self, request: task_pb2.GetUserRequest, context: aio.ServicerContext
    ) -> task_pb2.User:
        """Read a user by id or username."""
        return codec.user_message(await self._users.get(codec.user_lookup(request)))

    async def ListUsers(
        self, request: task_pb2.ListUsersRequest, context: aio.ServicerContext
    ) -> task_pb2.ListUsersResponse:
        """List users by username."""
        page = await self._users.list(codec.list_users(request))
        return task_pb2.ListUsersResponse(
            users=[codec.user_message(u) for u in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeactivateUser(
        self, request: task_pb2.DeactivateUserRequest, context: aio.ServicerContext
    ) -> task_pb2.User:
        """Deactivate a user."""
        return codec.user_message(await self._users.deactivate(codec.user_ref(request.id)))

    async def DeleteUser(
        self, request: task_pb2.DeleteUserRequest, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        """Delete a user who created no tasks."""
        await self._users.delete(codec.user_ref(request.id))
        return empty_pb2.Empty()
