"""The audit events a task or user change writes to the outbox, each built here and nowhere else.

Every event carries the actor it is attributed to, details redacted before they are stored
(`mhv_common.redaction`), and the request id and W3C traceparent of the call that caused it, so
the audit record joins the request's logs and trace. The store writes an event in the same
statement as its change (`mhv_task._store`), and the relay delivers it (`mhv_task._relay`).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mhv_common import context
from mhv_common.redaction import redact_details
from mhv_common.tracing import current_traceparent
from mhv_task._lifecycle import Action, Status
from mhv_task._models import Task, TaskCreateRequest, User, UserCreateRequest


class EventType(enum.StrEnum):
    """The audit event types of the plan, one per kind of task change."""

    CREATED = "task_created"
    UPDATED = "task_updated"
    DELETED = "task_deleted"
    ASSIGNED = "task_assigned"
    STARTED = "task_started"
    COMPLETED = "task_completed"
    CANCELLED = "task_cancelled"
    BLOCKED = "task_blocked"
    UNBLOCKED = "task_unblocked"
    USER_CREATED = "user_created"
    USER_DEACTIVATED = "user_deactivated"
    USER_DELETED = "user_deleted"


_TRANSITIONS = {
    Action.START: EventType.STARTED,
    Action.COMPLETE: EventType.COMPLETED,
    Action.CANCEL: EventType.CANCELLED,
    Action.BLOCK: EventType.BLOCKED,
    Action.UNBLOCK: EventType.UNBLOCKED,
}


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An audit event to write with its change.

    Attributes:
        event_type: What happened.
        actor: The user the change is attributed to (for a service, the user it acts for).
        details: What changed, already redacted.
        request_id: The request that made the change ("" outside a request).
        traceparent: Its W3C trace context ("" when there is none).
        subject_kind: ``task`` (the task the store writes it with) or ``user``.
        subject_id: The user's id for a user event; empty for a task event.
    """

    event_type: EventType
    actor: uuid.UUID
    details: dict[str, Any]
    request_id: str
    traceparent: str
    subject_kind: str = "task"
    subject_id: str = ""


def _event(
    event_type: EventType,
    actor: uuid.UUID,
    details: Mapping[str, Any],
    *,
    user: uuid.UUID | None = None,
) -> OutboxEvent:
    ctx = context.current()
    return OutboxEvent(
        event_type,
        actor,
        redact_details(details),
        ctx.request_id if ctx else "",
        current_traceparent(),
        subject_kind="task" if user is None else "user",
        subject_id="" if user is None else str(user),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _snapshot(task: Task | TaskCreateRequest, status: Status) -> dict[str, Any]:
    return {
        "title": task.title,
        "description": task.description,
        "repository": task.repository,
        "priority": task.priority,
        "status": status.value,
        "deadline": _jsonable(task.deadline),
        "assigned_to": _jsonable(task.assigned_to),
        "metadata": task.metadata,
    }


def task_created(actor: uuid.UUID, request: TaskCreateRequest) -> OutboxEvent:
    """A task was created from `request`."""
    return _event(EventType.CREATED, actor, _snapshot(request, Status.PENDING))


def field_changes(task: Task, values: Mapping[str, Any]) -> dict[str, Any]:
    """Field -> {"old", "new"} for each of `values` that differs from `task` (JSON values)."""
    return {
        field: {"old": _jsonable(getattr(task, field)), "new": _jsonable(value)}
        for field, value in values.items()
        if getattr(task, field) != value
    }


def task_updated(actor: uuid.UUID, changes: Mapping[str, Any]) -> OutboxEvent:
    """Fields of a task changed; `changes` as `field_changes` gives them."""
    return _event(EventType.UPDATED, actor, changes)


def task_assigned(
    actor: uuid.UUID,
    *,
    assigned_to: uuid.UUID | None,
    previous: uuid.UUID | None,
    reason: str | None = None,
) -> OutboxEvent:
    """A task was assigned to `assigned_to` (None: unassigned), replacing `previous`.

    `reason` says why when the change was not asked for directly (its assignee was deleted).
    """
    details: dict[str, Any] = {
        "assigned_to": _jsonable(assigned_to),
        "previous": _jsonable(previous),
    }
    if reason is not None:
        details["reason"] = reason
    return _event(EventType.ASSIGNED, actor, details)


def task_transitioned(action: Action, actor: uuid.UUID, details: Mapping[str, Any]) -> OutboxEvent:
    """A lifecycle change (`mhv_task._lifecycle.plan` gives its details)."""
    return _event(_TRANSITIONS[action], actor, details)


def task_deleted(actor: uuid.UUID, task: Task) -> OutboxEvent:
    """A task was deleted; the event keeps what it was."""
    details = {**_snapshot(task, task.status), "created_by": str(task.created_by)}
    return _event(EventType.DELETED, actor, details)


def _profile(user: User | UserCreateRequest) -> dict[str, Any]:
    return {
        "username": user.username,
        "email": user.email,
        "display_name": user.display_name,
        "metadata": user.metadata,
    }


def user_created(
    actor: uuid.UUID, user_id: uuid.UUID, request: UserCreateRequest, *, via: str | None = None
) -> OutboxEvent:
    """A user `user_id` was created from `request` (metadata redacted, as for tasks).

    `via` names the service that created them on nobody's behalf (the gateway registering a
    webhook sender; the actor is then the new user).
    """
    details = _profile(request)
    if via is not None:
        details["created_by_service"] = via
    return _event(EventType.USER_CREATED, actor, details, user=user_id)


def user_deactivated(actor: uuid.UUID, user: User) -> OutboxEvent:
    """`user` (as it was before) was deactivated."""
    details = {"username": user.username, "was_active": user.active}
    return _event(EventType.USER_DEACTIVATED, actor, details, user=user.id)


def user_deleted(actor: uuid.UUID, user: User, *, unassigned: int) -> OutboxEvent:
    """`user` was deleted after `unassigned` tasks were unassigned from them; keeps who it was."""
    details = {**_profile(user), "active": user.active, "tasks_unassigned": unassigned}
    return _event(EventType.USER_DELETED, actor, details, user=user.id)
