"""The gRPC edge of the task service: decode, call the domain, encode.

Nothing here decides anything: validation, authorization and the lifecycle live in the domain
modules. Errors are raised as `MahavishnuError`s and mapped by the common interceptors.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import empty_pb2, json_format, struct_pb2, timestamp_pb2
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.errors import FieldViolation, ValidationError
from mhv_task._lifecycle import Action
from mhv_task._models import clean_text
from mhv_task._tasks import Tasks, etag_of, parse_task_id
from mhv_task._users import Users, parse_user_id

PRIORITY_TO_PB = {
    "low": task_pb2.PRIORITY_LOW,
    "medium": task_pb2.PRIORITY_MEDIUM,
    "high": task_pb2.PRIORITY_HIGH,
    "critical": task_pb2.PRIORITY_CRITICAL,
}
PRIORITY_FROM_PB: dict[int, str] = {v: k for k, v in PRIORITY_TO_PB.items()}
STATUS_TO_PB = {
    "pending": task_pb2.TASK_STATUS_PENDING,
    "in_progress": task_pb2.TASK_STATUS_IN_PROGRESS,
    "completed": task_pb2.TASK_STATUS_COMPLETED,
    "cancelled": task_pb2.TASK_STATUS_CANCELLED,
    "blocked": task_pb2.TASK_STATUS_BLOCKED,
}
STATUS_FROM_PB: dict[int, str] = {v: k for k, v in STATUS_TO_PB.items()}


def _ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if value:
        out.update(dict(value))
    return out


def _dict(value: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(value)
    return result


def task_to_pb(row: Mapping[str, Any]) -> task_pb2.Task:
    """A stored task as the API's Task message."""
    gate = row["quality_gate"]
    return task_pb2.Task(
        id=row["id"],
        title=row["title"],
        description=row["description"] or "",
        repository=row["repository"],
        priority=PRIORITY_TO_PB[row["priority"]],
        status=STATUS_TO_PB[row["status"]],
        deadline=_ts(row["deadline"]),
        created_by=str(row["created_by"]),
        assigned_to=str(row["assigned_to"]) if row["assigned_to"] else "",
        metadata=_struct(row["metadata"]),
        blocked_reason=row["blocked_reason"] or "",
        cancel_reason=row["cancel_reason"] or "",
        quality_gate=task_pb2.QualityGateResult(
            passed=bool(gate.get("passed")),
            checks_run=int(gate.get("checks_run", 0)),
            checks=[task_pb2.QualityCheck(**c) for c in gate.get("checks", [])],
        )
        if gate
        else None,
        create_time=_ts(row["created_at"]),
        update_time=_ts(row["updated_at"]),
        start_time=_ts(row["started_at"]),
        complete_time=_ts(row["completed_at"]),
        etag=etag_of(row),
    )


def user_to_pb(row: Mapping[str, Any]) -> task_pb2.User:
    """A stored user as the API's User message."""
    return task_pb2.User(
        id=str(row["id"]),
        username=row["username"],
        email=row["email"],
        display_name=row["display_name"] or "",
        active=row["is_active"],
        metadata=_struct(row["metadata"]),
        create_time=_ts(row["created_at"]),
        update_time=_ts(row["updated_at"]),
        last_login_time=_ts(row["last_login_at"]),
    )


def _priority(value: int, field: str) -> str | None:
    if value == task_pb2.PRIORITY_UNSPECIFIED:
        return None
    if value not in PRIORITY_FROM_PB:
        raise ValidationError(violations=[FieldViolation(field, "unknown priority")])
    return PRIORITY_FROM_PB[value]


def _priority_value(value: int) -> str | None:
    # Unknown numbers go through as text so the domain reports them with the other violations.
    if value == task_pb2.PRIORITY_UNSPECIFIED:
        return None
    return PRIORITY_FROM_PB.get(value, f"unknown ({value})")


def _status(value: int, field: str) -> str | None:
    if value == task_pb2.TASK_STATUS_UNSPECIFIED:
        return None
    if value not in STATUS_FROM_PB:
        raise ValidationError(violations=[FieldViolation(field, "unknown status")])
    return STATUS_FROM_PB[value]


_REPOSITORY = re.compile(r"[A-Za-z0-9_-]{1,100}")
MAX_GATE_CHECKS = 200
MAX_CHECK_NAME = 200
MAX_CHECK_DETAIL = 2000


def _deadline_text(value: timestamp_pb2.Timestamp) -> str:
    # As text, so an update is held to the same "in the future" rule as a create.
    try:
        moment: dt.datetime = value.ToDatetime(dt.UTC)
    except (ValueError, OverflowError):
        raise ValidationError(
            violations=[FieldViolation("task.deadline", "is out of range (years 1 to 9999)")]
        ) from None
    return moment.isoformat()


def _quality_gate(gate: task_pb2.QualityGateResult) -> dict[str, Any]:
    """The quality-gate result to record, with its text cleaned and its size bounded."""
    problems = []
    if gate.checks_run < 0:
        problems.append(FieldViolation("quality_gate.checks_run", "must not be negative"))
    if len(gate.checks) > MAX_GATE_CHECKS:
        problems.append(FieldViolation("quality_gate.checks", f"at most {MAX_GATE_CHECKS} checks"))
    checks = []
    for i, check in enumerate(gate.checks[:MAX_GATE_CHECKS]):
        name, detail = clean_text(check.name), clean_text(check.detail)
        if len(name) > MAX_CHECK_NAME:
            problems.append(
                FieldViolation(f"quality_gate.checks[{i}].name", f"at most {MAX_CHECK_NAME}")
            )
        if len(detail) > MAX_CHECK_DETAIL:
            problems.append(
                FieldViolation(f"quality_gate.checks[{i}].detail", f"at most {MAX_CHECK_DETAIL}")
            )
        checks.append({"name": name, "passed": check.passed, "detail": detail})
    if problems:
        raise ValidationError(violations=problems)
    return {
        "passed": gate.passed,
        "checks_run": max(gate.checks_run, len(gate.checks)),
        "checks": checks,
    }


def _filters(request: Any, *, assignee: bool = True, priority: bool = True) -> dict[str, Any]:
    if request.repository and not _REPOSITORY.fullmatch(request.repository):
        raise ValidationError(
            violations=[FieldViolation("repository", "must match ^[A-Za-z0-9_-]+$, at most 100")]
        )
    filters: dict[str, Any] = {
        "repository": request.repository or None,
        "status": _status(request.status, "status"),
    }
    if priority:
        filters["priority"] = _priority(request.priority, "priority")
    if assignee:
        filters["assigned_to"] = (
            parse_user_id(request.assigned_to, field="assigned_to") if request.assigned_to else None
        )
    return filters


class TaskApi(task_pb2_grpc.TaskServiceServicer):
    """mahavishnu.task.v1.TaskService."""

    def __init__(self, tasks: Tasks) -> None:
        self._tasks = tasks

    async def CreateTask(
        self, request: task_pb2.CreateTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Create a task."""
        row = await self._tasks.create(
            {
                "title": request.title,
                "description": request.description or None,
                "repository": request.repository,
                "priority": _priority_value(request.priority) or "medium",
                "deadline": request.deadline or None,
                "metadata": _dict(request.metadata),
                "assigned_to": request.assigned_to or None,
                "request_id": request.request_id or None,
            }
        )
        return task_to_pb(row)

    async def GetTask(
        self, request: task_pb2.GetTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Read one task."""
        return task_to_pb(await self._tasks.get(parse_task_id(request.id)))

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: aio.ServicerContext
    ) -> task_pb2.ListTasksResponse:
        """List tasks, newest first."""
        rows, token = await self._tasks.list(
            _filters(request), page_size=request.page_size, page_token=request.page_token
        )
        return task_pb2.ListTasksResponse(
            tasks=[task_to_pb(r) for r in rows], next_page_token=token
        )

    async def UpdateTask(
        self, request: task_pb2.UpdateTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Change the fields named by the mask."""
        task = request.task
        values = {
            "title": task.title,
            "description": task.description,
            "priority": _priority_value(task.priority),
            # As text, so an update is held to the same "in the future" rule as a create.
            "deadline": _deadline_text(task.deadline) if task.HasField("deadline") else None,
            "metadata": _dict(task.metadata),
        }
        row = await self._tasks.update(
            parse_task_id(task.id),
            etag=task.etag,
            paths=list(request.update_mask.paths),
            values=values,
        )
        return task_to_pb(row)

    async def DeleteTask(
        self, request: task_pb2.DeleteTaskRequest, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        """Delete a task."""
        await self._tasks.delete(parse_task_id(request.id), etag=request.etag)
        return empty_pb2.Empty()

    async def SearchTasks(
        self, request: task_pb2.SearchTasksRequest, context: aio.ServicerContext
    ) -> task_pb2.SearchTasksResponse:
        """Full-text search."""
        rows, token = await self._tasks.search(
            request.query,
            _filters(request, assignee=False, priority=False),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return task_pb2.SearchTasksResponse(
            results=[task_pb2.SearchResult(task=task_to_pb(r), rank=r["rank"]) for r in rows],
            next_page_token=token,
        )

    async def AssignTask(
        self, request: task_pb2.AssignTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Assign or unassign."""
        assignee = (
            parse_user_id(request.assigned_to, field="assigned_to") if request.assigned_to else None
        )
        row = await self._tasks.assign(
            parse_task_id(request.id), etag=request.etag, assignee=assignee
        )
        return task_to_pb(row)

    async def StartTask(
        self, request: task_pb2.StartTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Move pending -> in_progress."""
        return task_to_pb(
            await self._tasks.transition(Action.START, parse_task_id(request.id), etag=request.etag)
        )

    async def CompleteTask(
        self, request: task_pb2.CompleteTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Move in_progress -> completed, with the quality-gate result."""
        result = _quality_gate(request.quality_gate)
        return task_to_pb(
            await self._tasks.transition(
                Action.COMPLETE, parse_task_id(request.id), etag=request.etag, quality_gate=result
            )
        )

    async def CancelTask(
        self, request: task_pb2.CancelTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Cancel an open task."""
        return task_to_pb(
            await self._tasks.transition(
                Action.CANCEL,
                parse_task_id(request.id),
                etag=request.etag,
                reason=_reason(request.reason),
            )
        )

    async def BlockTask(
        self, request: task_pb2.BlockTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Block a pending or in-progress task."""
        return task_to_pb(
            await self._tasks.transition(
                Action.BLOCK,
                parse_task_id(request.id),
                etag=request.etag,
                reason=_reason(request.reason),
            )
        )

    async def UnblockTask(
        self, request: task_pb2.UnblockTaskRequest, context: aio.ServicerContext
    ) -> task_pb2.Task:
        """Return a blocked task to its previous status."""
        return task_to_pb(
            await self._tasks.transition(
                Action.UNBLOCK, parse_task_id(request.id), etag=request.etag
            )
        )


def _reason(value: str) -> str:
    value = clean_text(value)
    if len(value) > 1000:
        raise ValidationError(violations=[FieldViolation("reason", "at most 1000 characters")])
    return value


class UserApi(task_pb2_grpc.UserServiceServicer):
    """mahavishnu.task.v1.UserService."""

    def __init__(self, users: Users) -> None:
        self._users = users

    async def CreateUser(
        self, request: task_pb2.CreateUserRequest, context: aio.ServicerContext
    ) -> task_pb2.User:
        """Create a user."""
        row = await self._users.create(
            {
                "username": request.username,
                "email": request.email,
                "display_name": request.display_name or None,
                "metadata": _dict(request.metadata),
            }
        )
        return user_to_pb(row)

    async def GetUser(
        self, request: task_pb2.GetUserRequest, context: aio.ServicerContext
    ) -> task_pb2.User:
        """Read a user by id or username."""
        return user_to_pb(await self._users.get(user_id=request.id, username=request.username))

    async def ListUsers(
        self, request: task_pb2.ListUsersRequest, context: aio.ServicerContext
    ) -> task_pb2.ListUsersResponse:
        """List users by username."""
        rows, token = await self._users.list(
            page_size=request.page_size,
            page_token=request.page_token,
            include_inactive=request.include_inactive,
        )
        return task_pb2.ListUsersResponse(
            users=[user_to_pb(r) for r in rows], next_page_token=token
        )

    async def DeactivateUser(
        self, request: task_pb2.DeactivateUserRequest, context: aio.ServicerContext
    ) -> task_pb2.User:
        """Deactivate a user."""
        return user_to_pb(await self._users.deactivate(request.id))

    async def DeleteUser(
        self, request: task_pb2.DeleteUserRequest, context: aio.ServicerContext
    ) -> empty_pb2.Empty:
        """Delete a user who created no tasks."""
        await self._users.delete(request.id)
        return empty_pb2.Empty()
