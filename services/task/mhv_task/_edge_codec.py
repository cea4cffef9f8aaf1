"""Protobuf <-> the domain's types, for the gRPC edge (`mhv_task._edge`).

Decoding copies a request's fields into the matching model of `mhv_task._models`, which
validates them; a value the API's types allow but the domain does not (an enum number with no
name) is passed on as it is, and a Struct holding NaN as the reason `mhv_common.structs`
refused it, for the model to refuse with the other violations. Encoding turns the domain's
objects into the API's messages.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from mahavishnu.task.v1 import task_pb2
from mhv_common.config import RepositoryCatalog
from mhv_common.structs import NotFiniteError, plain_struct
from mhv_common.timestamps import set_micros, to_micros
from mhv_task._lifecycle import Status
from mhv_task._models import (
    FTSSearchQuery,
    Page,
    SearchHit,
    SearchMode,
    SearchPage,
    Task,
    TaskAssignRequest,
    TaskCreateRequest,
    TaskListRequest,
    TaskRef,
    TaskTransitionRequest,
    TaskUpdateRequest,
    User,
    UserCreateRequest,
    UserListRequest,
    UserLookup,
    UserRef,
    validate,
)

PRIORITY_TO_PB = {
    "low": task_pb2.PRIORITY_LOW,
    "medium": task_pb2.PRIORITY_MEDIUM,
    "high": task_pb2.PRIORITY_HIGH,
    "critical": task_pb2.PRIORITY_CRITICAL,
}
PRIORITY_FROM_PB: dict[int, str] = {v: k for k, v in PRIORITY_TO_PB.items()}
STATUS_TO_PB = {
    Status.PENDING: task_pb2.TASK_STATUS_PENDING,
    Status.IN_PROGRESS: task_pb2.TASK_STATUS_IN_PROGRESS,
    Status.COMPLETED: task_pb2.TASK_STATUS_COMPLETED,
    Status.CANCELLED: task_pb2.TASK_STATUS_CANCELLED,
    Status.BLOCKED: task_pb2.TASK_STATUS_BLOCKED,
}
STATUS_FROM_PB: dict[int, str] = {v: k.value for k, v in STATUS_TO_PB.items()}


# --- well-known types ---------------------------------------------------------------------------


def _struct(struct: struct_pb2.Struct) -> dict[str, Any] | NotFiniteError:
    # A Struct holding NaN or an infinity goes on as the reason it was refused, for the model
    # to report with the other violations (see `mhv_task._models.Metadata`).
    try:
        return plain_struct(struct)
    except NotFiniteError as refused:
        return refused


def _set_struct(field: struct_pb2.Struct, value: Mapping[str, Any]) -> None:
    # Always present, as the API has always sent it, even when empty.
    field.SetInParent()
    if value:
        field.update(value)


def _set_time(field: timestamp_pb2.Timestamp, value: dt.datetime | None) -> None:
    # Through microseconds: a fraction of Timestamp.FromDatetime's cost, and exact for every
    # stored time (PostgreSQL keeps microseconds).
    if value is not None:
        set_micros(field, to_micros(value))


def _priority(value: int) -> str | int | None:
    # Unspecified is None; a number without a name goes on as it is.
    return None if value == task_pb2.PRIORITY_UNSPECIFIED else PRIORITY_FROM_PB.get(value, value)


def _status(value: int) -> str | int | None:
    return None if value == task_pb2.TASK_STATUS_UNSPECIFIED else STATUS_FROM_PB.get(value, value)


# --- requests -----------------------------------------------------------------------------------


def create_task(
    request: task_pb2.CreateTaskRequest, repositories: RepositoryCatalog
) -> TaskCreateRequest:
    """CreateTask, checked against the configured repositories as well."""
    return validate(
        TaskCreateRequest,
        {
            "title": request.title,
            "description": request.description or None,
            "repository": request.repository,
            "priority": _priority(request.priority),
            "deadline": request.deadline or None,
            "metadata": _struct(request.metadata),
            "assigned_to": request.assigned_to or None,
            "request_id": request.request_id or None,
        },
        context=repositories,
    )


def task_ref(task_id: int, etag: str = "") -> TaskRef:
    """GetTask and DeleteTask."""
    return validate(TaskRef, {"id": task_id, "etag": etag})


def list_tasks(request: task_pb2.ListTasksRequest) -> TaskListRequest:
    """ListTasks."""
    return validate(
        TaskListRequest,
        {
            "repository": request.repository or None,
            "status": _status(request.status),
            "priority": _priority(request.priority),
            "assigned_to": request.assigned_to or None,
            "page_size": request.page_size,
            "page_token": request.page_token,
        },
    )


SEARCH_MODE_FROM_PB: dict[task_pb2.SearchMode, SearchMode] = {
    task_pb2.SEARCH_MODE_KEYWORD: SearchMode.KEYWORD,
    task_pb2.SEARCH_MODE_SEMANTIC: SearchMode.SEMANTIC,
    task_pb2.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}
SEARCH_MODE_TO_PB: dict[SearchMode, task_pb2.SearchMode] = {
    mode: number for number, mode in SEARCH_MODE_FROM_PB.items()
}


def search_mode(value: int) -> SearchMode | int | None:
    """The requested mode (None: unspecified; an unknown number is left for validation)."""
    if value == task_pb2.SEARCH_MODE_UNSPECIFIED:
        return None
    return SEARCH_MODE_FROM_PB.get(task_pb2.SearchMode.ValueType(value), value)


def search_tasks(request: task_pb2.SearchTasksRequest) -> FTSSearchQuery:
    """SearchTasks."""
    return validate(
        FTSSearchQuery,
        {
            "query": request.query,
            "mode": search_mode(request.mode),
            "repository": request.repository or None,
            "status": _status(request.status),
            "page_size": request.page_size,
            "page_token": request.page_token,
        },
    )


def update_task(
    request: task_pb2.UpdateTaskRequest, repositories: RepositoryCatalog | None = None
) -> TaskUpdateRequest:
    """UpdateTask: the task's fields and the mask naming those to change.

    A new repository is checked against `repositories` with the other fields.
    """
    task = request.task
    deadline = (task.deadline.seconds, task.deadline.nanos) if task.HasField("deadline") else None
    return validate(
        TaskUpdateRequest,
        {
            "id": task.id,
            "etag": task.etag,
            "task": {
                "title": task.title,
                "description": task.description,
                "priority": _priority(task.priority),
                "deadline": deadline,
                "metadata": _struct(task.metadata),
                "repository": task.repository or None,
            },
            "update_mask": {"paths": list(request.update_mask.paths)},
        },
        context=repositories,
    )


def assign_task(request: task_pb2.AssignTaskRequest) -> TaskAssignRequest:
    """AssignTask."""
    return validate(
        TaskAssignRequest,
        {"id": request.id, "etag": request.etag, "assigned_to": request.assigned_to or None},
    )


def transition(
    request: task_pb2.StartTaskRequest
    | task_pb2.UnblockTaskRequest
    | task_pb2.CancelTaskRequest
    | task_pb2.BlockTaskRequest,
) -> TaskTransitionRequest:
    """StartTask, UnblockTask (id and etag); CancelTask and BlockTask (and a reason)."""
    data: dict[str, Any] = {"id": request.id, "etag": request.etag}
    if isinstance(request, task_pb2.CancelTaskRequest | task_pb2.BlockTaskRequest):
        data["reason"] = request.reason
    return validate(TaskTransitionRequest, data)


def complete_task(request: task_pb2.CompleteTaskRequest) -> TaskTransitionRequest:
    """CompleteTask, with its quality-gate result (none given: a failed, empty gate)."""
    gate = request.quality_gate
    return validate(
        TaskTransitionRequest,
        {
            "id": request.id,
            "etag": request.etag,
            "quality_gate": {
                "passed": gate.passed,
                "checks_run": gate.checks_run,
                "not_run": gate.not_run,
                "checks": [
                    {"name": c.name, "passed": c.passed, "detail": c.detail} for c in gate.checks
                ],
            },
        },
    )


def create_user(request: task_pb2.CreateUserRequest) -> UserCreateRequest:
    """CreateUser."""
    return validate(
        UserCreateRequest,
        {
            "username": request.username,
            "email": request.email,
            "display_name": request.display_name or None,
            "metadata": _struct(request.metadata),
        },
    )


def user_lookup(request: task_pb2.GetUserRequest) -> UserLookup:
    """GetUser."""
    return validate(UserLookup, {"id": request.id or None, "username": request.username})


def user_ref(user_id: str) -> UserRef:
    """DeactivateUser and DeleteUser."""
    return validate(UserRef, {"id": user_id})


def list_users(request: task_pb2.ListUsersRequest) -> UserListRequest:
    """ListUsers."""
    return validate(
        UserListRequest,
        {
            "include_inactive": request.include_inactive,
            "page_size": request.page_size,
            "page_token": request.page_token,
        },
    )


# --- responses ----------------------------------------------------------------------------------


def task_message(task: Task) -> task_pb2.Task:
    """A task as the API's Task message."""
    return _fill_task(_scalars(task_pb2.Task, task), task)


def list_response(page: Page[Task]) -> task_pb2.ListTasksResponse:
    """A page of tasks as the ListTasks response."""
    response = task_pb2.ListTasksResponse(next_page_token=page.next_page_token)
    # Each task is built inside the response's own list: a message built apart and then
    # appended would be copied.
    add = response.tasks.add
    for task in page.items:
        _fill_task(_scalars(add, task), task)
    return response


def _fill_task(message: task_pb2.Task, task: Task) -> task_pb2.Task:
    # Sub-messages are filled in place: passing them to the constructor would copy them.
    _set_struct(message.metadata, task.metadata)
    set_micros(message.create_time, to_micros(task.created_at))
    set_micros(message.update_time, to_micros(task.updated_at))
    if task.deadline is not None:
        set_micros(message.deadline, to_micros(task.deadline))
    if task.started_at is not None:
        set_micros(message.start_time, to_micros(task.started_at))
    if task.completed_at is not None:
        set_micros(message.complete_time, to_micros(task.completed_at))
    gate = task.quality_gate
    if gate is not None:
        result = message.quality_gate
        result.passed = gate.passed
        result.checks_run = gate.checks_run
        result.not_run = gate.not_run
        for check in gate.checks:
            result.checks.add(name=check.name, passed=check.passed, detail=check.detail)
        result.SetInParent()
    return message


def _scalars(make: Callable[..., task_pb2.Task], task: Task) -> task_pb2.Task:
    # `make` is the Task constructor or the `add` of a repeated Task field.
    return make(
        id=task.id,
        title=task.title,
        description=task.description or "",
        repository=task.repository,
        priority=PRIORITY_TO_PB[task.priority],
        status=STATUS_TO_PB[task.status],
        created_by=str(task.created_by),
        assigned_to=str(task.assigned_to) if task.assigned_to else "",
        blocked_reason=task.blocked_reason or "",
        cancel_reason=task.cancel_reason or "",
        etag=task.etag,
    )


def search_response(page: SearchPage) -> task_pb2.SearchTasksResponse:
    """A page of search results as the API's SearchTasksResponse."""
    return task_pb2.SearchTasksResponse(
        results=[_search_result(hit) for hit in page.items],
        next_page_token=page.next_page_token,
        mode=SEARCH_MODE_TO_PB[page.mode],
    )


def _search_result(hit: SearchHit) -> task_pb2.SearchResult:
    return task_pb2.SearchResult(
        task=task_message(hit.task),
        rank=hit.rank,
        matched=[SEARCH_MODE_TO_PB[mode] for mode in hit.matched],
        score=hit.score,
        similarity=hit.similarity,
    )


def user_message(user: User) -> task_pb2.User:
    """A user as the API's User message."""
    message = task_pb2.User(
        id=str(user.id),
        username=user.username,
        email=user.email,
        display_name=user.display_name or "",
        active=user.active,
    )
    _set_struct(message.metadata, user.metadata)
    _set_time(message.create_time, user.created_at)
    _set_time(message.update_time, user.updated_at)
    _set_time(message.last_login_time, user.last_login_at)
    return message
