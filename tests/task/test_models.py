"""The request models: every rule the service applies before touching the database.

Pure: no database, no process. The same rules seen through gRPC are in test_tasks.py,
test_hardening.py and test_search.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from mhv_common.errors import MahavishnuError
from mhv_task._models import (
    MAX_METADATA_BYTES,
    FTSSearchQuery,
    QualityGate,
    TaskCreateRequest,
    TaskListRequest,
    TaskTransitionRequest,
    TaskUpdateRequest,
    UserCreateRequest,
    UserLookup,
    validate,
)
from tests.task.conftest import REPOSITORIES as CATALOG

USER = "6f1c3a52-9d51-4a3c-8a51-0e8a3e1f7b10"


def refusal(model: type[BaseModel], data: dict[str, Any], **kw: Any) -> MahavishnuError:
    with pytest.raises(MahavishnuError) as refused:
        validate(model, data, **kw)
    return refused.value


def problems(model: type[BaseModel], data: dict[str, Any], **kw: Any) -> dict[str, str]:
    error = refusal(model, data, **kw)
    assert error.code == "MHV-003"
    return {v.field: v.description for v in error.violations}


def update(paths: list[str], **values: Any) -> dict[str, Any]:
    task = {"title": "", "description": "", "priority": None, "deadline": None, "metadata": {}}
    return {"id": 7, "etag": "e", "task": {**task, **values}, "update_mask": {"paths": paths}}


# --- CreateTask ---------------------------------------------------------------------------------


def test_unspecified_priority_is_medium_and_a_nameless_number_is_refused() -> None:
    made = validate(TaskCreateRequest, {"title": "t", "repository": "demo", "priority": None})
    assert made.priority == "medium"
    assert "priority" in problems(
        TaskCreateRequest, {"title": "t", "repository": "demo", "priority": 9}
    )


def test_an_unconfigured_repository_alone_is_not_found() -> None:
    error = refusal(TaskCreateRequest, {"title": "t", "repository": "elsewhere"}, context=CATALOG)
    assert error.code == "MHV-200"
    assert [v.field for v in error.violations] == ["repository"]
    assert "settings/repos.yaml" in error.violations[0].description


def test_an_unconfigured_repository_is_reported_with_the_other_problems() -> None:
    found = problems(TaskCreateRequest, {"title": "", "repository": "elsewhere"}, context=CATALOG)
    assert set(found) == {"title", "repository"}
    assert "settings/repos.yaml" in found["repository"]


def test_without_the_catalog_only_the_shape_of_a_repository_is_checked() -> None:
    assert validate(TaskCreateRequest, {"title": "t", "repository": "elsewhere"}).repository
    assert "repository" in problems(TaskCreateRequest, {"title": "t", "repository": "a b"})


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"note": "a\x00b"}, "NUL"),
        ({"k\x00": "v"}, "NUL"),
        ({"deep": [{"x": "\x00"}]}, "NUL"),
        ({"ratio": float("nan")}, "finite"),
        ({"list": [1.0, float("inf")]}, "finite"),
        ({"big": "x" * MAX_METADATA_BYTES}, "bytes"),
    ],
)
def test_metadata_jsonb_cannot_hold_is_refused(metadata: dict[str, Any], words: str) -> None:
    found = problems(TaskCreateRequest, {"title": "t", "repository": "demo", "metadata": metadata})
    assert words in found["metadata"]


def test_the_idempotency_fingerprint_is_stable_across_releases() -> None:
    # Stored with each task created with a request_id: a change would turn a retry after an
    # upgrade into "request_id already used for a different request".
    request = validate(
        TaskCreateRequest,
        {
            "title": " Ship it 🚀 ",
            "description": "why",
            "repository": "demo",
            "priority": "high",
            "deadline": "2031-02-03T04:05:06+02:00",
            "metadata": {"labels": ["infra"], "points": 3.0},
            "assigned_to": USER,
            "request_id": "delivery-1",
        },
    )
    assert request.fingerprint() == (
        "16d85972d27f4b7bfef5f9ba34da4e55505f07255c6a674a5c2b703887a7bc13"
    )
    other = request.model_copy(update={"request_id": "delivery-2"})
    assert other.fingerprint() == request.fingerprint()


# --- UpdateTask ---------------------------------------------------------------------------------


def test_values_outside_the_mask_are_ignored_not_validated() -> None:
    made = validate(TaskUpdateRequest, update(["description"], description="  new  "))
    assert made.changes() == {"description": "new"}


def test_mask_problems_name_the_path() -> None:
    found = problems(TaskUpdateRequest, update(["title", "status", "id"], title="ok"))
    assert set(found) == {"update_mask.paths[1]", "update_mask.paths[2]"}
    assert (
        "updatable: title, description, priority, deadline, metadata, repository"
        in found["update_mask.paths[1]"]
    )
    assert problems(TaskUpdateRequest, update([])) == {
        "update_mask": "must name at least one field"
    }


def test_named_fields_follow_the_create_rules() -> None:
    found = problems(TaskUpdateRequest, update(["title", "priority"], title=" ", priority=12))
    assert set(found) == {"task.title", "task.priority"}
    cleared = validate(TaskUpdateRequest, update(["priority", "deadline", "metadata"]))
    assert cleared.changes() == {"priority": "medium", "deadline": None, "metadata": {}}


def test_an_update_moves_a_task_only_to_a_configured_repository() -> None:
    moved = validate(TaskUpdateRequest, update(["repository"], repository="demo"), context=CATALOG)
    assert moved.changes() == {"repository": "demo"}
    elsewhere = update(["repository"], repository="elsewhere")
    error = refusal(TaskUpdateRequest, elsewhere, context=CATALOG)
    assert error.code == "MHV-200"
    assert problems(TaskUpdateRequest, update(["repository"], repository=None)) == {
        "task.repository": "must name a configured repository"
    }


def test_an_update_deadline_from_a_timestamp() -> None:
    future = dt.datetime(2031, 2, 3, 4, 5, 6, 789000, tzinfo=dt.UTC)
    stamp = (int(future.timestamp()), 789_000_999)  # nanoseconds beyond micros are dropped
    made = validate(TaskUpdateRequest, update(["deadline"], deadline=stamp))
    assert made.changes()["deadline"] == future
    assert problems(TaskUpdateRequest, update(["deadline"], deadline=(10**13, 0))) == {
        "task.deadline": "is out of range (years 1 to 9999)"
    }
    assert problems(TaskUpdateRequest, update(["deadline"], deadline=(0, 0))) == {
        "task.deadline": "must be in the future"
    }


def test_task_ids_are_positive() -> None:
    assert problems(TaskUpdateRequest, {**update(["title"], title="t"), "id": 0}) == {
        "id": "must be a positive task id"
    }


# --- filters, search, reasons, quality gates ----------------------------------------------------


def test_filters_report_each_problem() -> None:
    found = problems(
        TaskListRequest,
        {"repository": "de\x00mo", "status": 9, "priority": 7, "assigned_to": "bob"},
    )
    assert found == {
        "repository": "must match ^[A-Za-z0-9_-]+$ (letters, digits, '_' and '-')",
        "status": "unknown status",
        "priority": "unknown priority",
        "assigned_to": "is not a user id (UUID)",
    }


def test_filters_bind_page_tokens_by_value() -> None:
    listing = validate(TaskListRequest, {"status": "pending", "assigned_to": USER})
    assert listing.filters() == {
        "repository": None,
        "status": "pending",
        "priority": None,
        "assigned_to": uuid.UUID(USER),
    }
    search = validate(FTSSearchQuery, {"query": " flaky\x00 ", "repository": "demo"})
    assert (search.query, search.filters()) == ("flaky", {"repository": "demo", "status": None})


def test_reasons_are_cleaned_and_bounded() -> None:
    made = validate(TaskTransitionRequest, {"id": 1, "reason": " wait\x00ing\x07 "})
    assert made.reason == "waiting"
    assert problems(TaskTransitionRequest, {"id": 1, "reason": "r" * 1001}) == {
        "reason": "at most 1000 characters"
    }


def gate(**fields: Any) -> dict[str, Any]:
    return {"id": 1, "quality_gate": {"passed": True, "checks_run": 0, "checks": [], **fields}}


def test_a_quality_gate_counts_at_least_its_checks_and_cleans_their_text() -> None:
    made = validate(
        TaskTransitionRequest,
        gate(checks_run=1, checks=[{"name": "li\x00nt", "passed": True, "detail": " ok\x1b "}] * 3),
    )
    assert made.quality_gate is not None
    assert made.quality_gate.stored() == {
        "passed": True,
        "checks_run": 3,
        "checks": [{"name": "lint", "passed": True, "detail": "ok"}] * 3,
    }
    assert QualityGate.from_stored(made.quality_gate.stored()) == made.quality_gate


def test_a_gate_that_did_not_run_says_so_and_nothing_else() -> None:
    made = validate(TaskTransitionRequest, gate(passed=False, not_run=True))
    assert made.quality_gate is not None
    assert made.quality_gate.stored() == {
        "passed": False,
        "checks_run": 0,
        "checks": [],
        "not_run": True,
    }
    assert QualityGate.from_stored(made.quality_gate.stored()) == made.quality_gate
    for invented in ({"passed": True}, {"passed": False, "checks_run": 1}):
        found = problems(TaskTransitionRequest, gate(not_run=True, **invented))
        assert found == {
            "quality_gate": "a gate that did not run has no result: passed, checks_run and "
            "checks must be empty"
        }


def test_quality_gate_problems_name_the_check() -> None:
    found = problems(
        TaskTransitionRequest,
        gate(checks_run=-1, checks=[{"name": "ok"}, {"name": "n" * 201, "detail": "d" * 2001}]),
    )
    assert found == {
        "quality_gate.checks_run": "must not be negative",
        "quality_gate.checks[1].name": "at most 200",
        "quality_gate.checks[1].detail": "at most 2000",
    }
    too_many = problems(TaskTransitionRequest, gate(checks=[{"name": "c"}] * 201))
    assert too_many == {"quality_gate.checks": "at most 200 checks"}


# --- users --------------------------------------------------------------------------------------


def test_user_rules() -> None:
    found = problems(
        UserCreateRequest,
        {"username": "admin\n", "email": "a\x00@b.test", "metadata": {"x": float("inf")}},
    )
    assert set(found) == {"username", "email", "metadata"}
    made = validate(
        UserCreateRequest, {"username": "a.b", "email": " a@b.test ", "display_name": " "}
    )
    assert (made.email, made.display_name) == ("a@b.test", None)
    assert validate(UserLookup, {"id": None, "username": "x"}).id is None
    assert problems(UserLookup, {"id": "nope"}) == {"id": "is not a user id (UUID)"}
    # Only the canonical spelling: the same user must not have several ids.
    assert problems(UserLookup, {"id": uuid.uuid4().hex}) == {"id": "is not a user id (UUID)"}


def test_the_models_are_frozen() -> None:
    made = validate(TaskListRequest, {})
    with pytest.raises(ValueError, match="frozen"):
        made.page_size = 5  # type: ignore[misc]
