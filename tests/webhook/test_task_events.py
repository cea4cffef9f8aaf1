"""Task events v1: the schema, what breaking it tells the sender, and the changes events ask for."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import jsonschema
import pytest

from mhv_common.config import Repository, RepositoryCatalog
from mhv_common.errors import ValidationError
from mhv_tools import gen_schemas
from mhv_webhook._changes import IgnoredEvent, Kind, Missing, QualityGate, TaskChange
from mhv_webhook._task_events import SCHEMA, TYPES, check, interpret
from tests.webhook.fixtures import payload, task_event

REPOSITORIES = RepositoryCatalog((Repository(name="demo"), Repository(name="ops")))


def problems(event: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as refused:
        check(event, REPOSITORIES)
    assert refused.value.code == "MHV-003"
    return {v.field: v.description for v in refused.value.violations}


def test_the_schema_is_valid_json_schema_and_published_as_generated() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert gen_schemas.main(["--check"]) == 0, "docs/webhooks is stale: run `make generate`"
    published = json.loads((gen_schemas.DOCS / "task-events.v1.schema.json").read_text())
    assert published == SCHEMA
    assert TYPES == ("task.create", "task.update", "task.assign", "task.complete", "task.cancel")


@pytest.mark.parametrize("kind", ["create", "update", "assign", "complete", "cancel"])
def test_the_documented_examples_are_valid(kind: str) -> None:
    event = payload(f"standard/task.{kind}")
    jsonschema.validate(event, SCHEMA)
    check(event, REPOSITORIES)


def test_other_types_are_not_task_events_and_are_not_checked() -> None:
    check(payload("standard/task.other"), REPOSITORIES)
    check({"type": "task.archive", "anything": [1]}, REPOSITORIES)
    check({"no": "type"}, REPOSITORIES)


def test_every_problem_is_named_by_its_path() -> None:
    event = task_event("create", "x" * 201, title="", repository="no such", priority="urgent")
    event["data"]["colour"] = "blue"
    del event["timestamp"]
    assert problems(event) == {
        "timestamp": "is required",
        "data.external_id": "does not have the required form (^[\\x21-\\x7e]{1,200}$)",
        "data.title": "must not be empty",
        "data.repository": "does not have the required form (^[A-Za-z0-9_-]+$)",
        "data.priority": "must be one of low, medium, high, critical",
        "data.colour": "is not a field of this event",
    }
    assert problems({"type": "task.update", "timestamp": "2026-01-01T00:00:00Z", "data": []}) == {
        "data": "must be of type object"
    }
    assert problems(task_event("update", "t-1", title=None)) == {
        "data.title": "must be of type string"
    }
    assert problems(
        {"type": "task.update", "timestamp": "2026-01-01T00:00:00Z", "data": {"external_id": "t"}}
    ) == {"data": "names no field to change"}
    assert problems(task_event("assign", "t-1", assignee="not a name")) == {
        "data.assignee": "does not have the required form (^[A-Za-z0-9._-]{1,64}$)"
    }
    gate = {"passed": "yes", "checks": [{"passed": True}]}
    assert problems(task_event("complete", "t-1", quality_gate=gate)) == {
        "data.quality_gate.checks.0.name": "is required",
        "data.quality_gate.passed": "must be of type boolean",
    }


def test_what_a_schema_cannot_say_is_checked_too() -> None:
    past = task_event("create", "t-1", deadline="2020-01-01T00:00:00Z")
    assert problems(past) == {"data.deadline": "must be in the future"}
    month_13 = task_event("create", "t-1", deadline="2031-13-01T00:00:00Z")
    assert problems(month_13) == {"data.deadline": "is not a valid date-time"}
    elsewhere = task_event("create", "t-1", repository="mahavishnu")
    assert problems(elsewhere) == {
        "data.repository": "'mahavishnu' is not configured; configured: demo, ops"
    }


def test_task_events_become_task_changes() -> None:
    at = dt.datetime(2026, 3, 2, 8, 15, 30, 123456, tzinfo=dt.UTC)
    created = interpret(
        source="ops", payload=payload("standard/task.create"), repositories=REPOSITORIES
    )
    assert created == TaskChange(
        kind=Kind.OPENED,
        source="ops",
        external_key="ops-ticket-1042",
        repository="demo",
        actor="ops.ops-bot",
        title="Rotate the staging database password",
        description="The password is 90 days old; rotate it and update the vault entry.",
        priority="high",
        deadline="2031-04-01T17:00:00+00:00",
        metadata={"origin": {"source": "ops", "key": "ops-ticket-1042"}},
        happened_at=at,
    )

    def change(kind: str, **data: Any) -> TaskChange:
        found = interpret(
            source="ops", payload=task_event(kind, "t-1", **data), repositories=REPOSITORIES
        )
        assert isinstance(found, TaskChange)
        # Every change but a creation waits for the task's creation to be processed.
        assert found.missing == (Missing.CREATE if kind == "create" else Missing.WAIT)
        return found

    updated = change("update")
    assert (updated.kind, updated.title, updated.description, updated.priority) == (
        Kind.EDITED,
        "Rotate the staging and test database passwords",
        None,
        "critical",
    )
    assert change("assign").assignees == ("ops.dana",)
    assert change("assign", assignee=None).assignees == ()
    done = change("complete")
    assert (done.kind, done.cancel_reason) == (Kind.CLOSED, "")
    assert done.quality_gate == QualityGate(
        passed=True,
        checks_run=2,
        checks=(("vault-entry-updated", True, ""), ("staging-smoke-test", True, "12/12")),
    )
    # No gate reported: none ran.
    assert change("complete", quality_gate=None).quality_gate is None
    cancelled = change("cancel")
    assert (cancelled.kind, cancelled.cancel_reason) == (
        Kind.CLOSED,
        "Superseded by ops-ticket-1050",
    )
    assert change("cancel", reason="").cancel_reason == "cancelled by ops"
    default_actor = interpret(
        source="ops",
        payload={**task_event("update", "t-1"), "data": {"external_id": "t-1", "title": "x"}},
        repositories=REPOSITORIES,
    )
    assert isinstance(default_actor, TaskChange) and default_actor.actor == "ops.system"


def test_what_no_task_can_follow_is_ignored_with_the_reason() -> None:
    other = interpret(
        source="ops", payload=payload("standard/task.other"), repositories=REPOSITORIES
    )
    assert other == IgnoredEvent("'invoice.paid' is not a task event: no task mapping")
    # The repository was configured when the event arrived, and is no longer.
    gone = interpret(
        source="ops",
        payload=task_event("create", "t-1", repository="retired"),
        repositories=REPOSITORIES,
    )
    assert gone == IgnoredEvent("repository 'retired' is not configured")
