"""The outbox events: one builder per kind, redacted, carrying the request that caused them.

Pure: that each committed change writes exactly one of them is test_outbox.py's business.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import uuid

import pytest

from mhv_common import context
from mhv_task import _events as events
from mhv_task._events import EventType
from mhv_task._lifecycle import TRANSITIONS, Action, Status
from mhv_task._models import Task, TaskCreateRequest, User, UserCreateRequest, validate
from tests.harness import ROOT

ACTOR = uuid.UUID("6f1c3a52-9d51-4a3c-8a51-0e8a3e1f7b10")
OTHER = uuid.UUID("0b7e3c1e-2f43-4a8e-9d61-5a1c2b3d4e5f")
NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _task(**fields: object) -> Task:
    values: dict[str, object] = {
        "id": 1,
        "title": "Fix it",
        "description": "secret plan",
        "repository": "demo",
        "priority": "high",
        "status": Status.IN_PROGRESS,
        "status_before_block": None,
        "deadline": NOW,
        "created_by": ACTOR,
        "assigned_to": None,
        "metadata": {"api_key": "sk-1"},
        "blocked_reason": None,
        "cancel_reason": None,
        "quality_gate": None,
        "created_at": NOW,
        "updated_at": NOW,
        "started_at": None,
        "completed_at": None,
        "version": 3,
    }
    return Task(**{**values, **fields})  # type: ignore[arg-type]


def test_the_types_are_those_the_outbox_accepts() -> None:
    migration = (ROOT / "migrations" / "task" / "0006_outbox_subjects.up.sql").read_text()
    check = re.search(r"CHECK \(event_type IN \(([^)]*)\)", migration)
    assert check is not None
    assert {v.value for v in EventType} == set(re.findall(r"'(\w+)'", check.group(1)))


def test_an_event_carries_the_request_and_is_frozen() -> None:
    request = validate(TaskCreateRequest, {"title": "t", "repository": "demo"})
    with context.bind(context.RequestContext(request_id="req-123", method="/x")):
        event = events.task_created(ACTOR, request)
    assert (event.event_type, event.actor, event.request_id) == (
        EventType.CREATED,
        ACTOR,
        "req-123",
    )
    assert event.traceparent == ""  # no span here; the service's spans fill it (test_outbox)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.actor = OTHER  # type: ignore[misc]
    assert events.task_created(ACTOR, request).request_id == ""  # outside any request


def test_created_and_deleted_keep_a_redacted_snapshot() -> None:
    request = validate(
        TaskCreateRequest,
        {
            "title": "t",
            "repository": "demo",
            "description": "secret plan",
            "deadline": "2031-01-01T00:00:00Z",
            "assigned_to": str(OTHER),
            "metadata": {"note": "x"},
        },
    )
    created = events.task_created(ACTOR, request).details
    assert created == {
        "title": "t",
        "description": "[REDACTED (11 characters)]",
        "repository": "demo",
        "priority": "medium",
        "status": "pending",
        "deadline": "2031-01-01T00:00:00+00:00",
        "assigned_to": str(OTHER),
        "metadata": "[REDACTED (13 characters)]",
    }
    deleted = events.task_deleted(ACTOR, _task()).details
    assert deleted["status"] == "in_progress"
    assert deleted["created_by"] == str(ACTOR)
    assert deleted["description"] == "[REDACTED (11 characters)]"
    assert "sk-1" not in str(deleted)


def test_updates_record_only_what_differs() -> None:
    task = _task()
    changes = events.field_changes(task, {"title": "Fix it", "deadline": None, "priority": "low"})
    assert changes == {
        "deadline": {"old": NOW.isoformat(), "new": None},
        "priority": {"old": "high", "new": "low"},
    }
    assert events.field_changes(task, {"title": "Fix it"}) == {}
    assert events.task_updated(ACTOR, changes).event_type == EventType.UPDATED


def test_assignments_say_who_before_and_why() -> None:
    direct = events.task_assigned(ACTOR, assigned_to=OTHER, previous=None)
    assert direct.details == {"assigned_to": str(OTHER), "previous": None}
    deleted = events.task_assigned(ACTOR, assigned_to=None, previous=OTHER, reason="user deleted")
    assert deleted.details == {
        "assigned_to": None,
        "previous": str(OTHER),
        "reason": "user deleted",
    }
    assert {direct.event_type, deleted.event_type} == {EventType.ASSIGNED}


PAST = {
    Action.START: "task_started",
    Action.COMPLETE: "task_completed",
    Action.CANCEL: "task_cancelled",
    Action.BLOCK: "task_blocked",
    Action.UNBLOCK: "task_unblocked",
}


@pytest.mark.parametrize("action", TRANSITIONS)
def test_each_transition_has_its_type_and_redacted_details(action: Action) -> None:
    event = events.task_transitioned(action, ACTOR, {"reason": "r", "token": "abc"})
    assert event.event_type == PAST[action]
    assert event.details == {"reason": "r", "token": "[REDACTED (3 characters)]"}


def test_user_events_name_their_user_and_redact_like_task_events() -> None:
    request = validate(
        UserCreateRequest,
        {"username": "ada", "email": "ada@example.test", "metadata": {"api_key": "sk-1"}},
    )
    created = events.user_created(ACTOR, OTHER, request)
    assert (created.event_type, created.subject_kind, created.subject_id) == (
        EventType.USER_CREATED,
        "user",
        str(OTHER),
    )
    assert created.details["metadata"] == "[REDACTED (19 characters)]"
    user = User(OTHER, "ada", "ada@example.test", None, True, {"password": "x"}, NOW, NOW, None)
    deleted = events.user_deleted(ACTOR, user, unassigned=2)
    assert deleted.details["tasks_unassigned"] == 2 and "x" not in str(deleted.details["metadata"])
    assert events.user_deactivated(ACTOR, user).details == {"username": "ada", "was_active": True}
    # Task events stay about their task (the store gives them its id).
    task_event = events.task_created(
        ACTOR, validate(TaskCreateRequest, {"title": "t", "repository": "d"})
    )
    assert (task_event.subject_kind, task_event.subject_id) == ("task", "")
