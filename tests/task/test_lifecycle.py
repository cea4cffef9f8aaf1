"""The task lifecycle: the state machine on its own, then through real gRPC and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import asyncpg
import grpc
import pytest

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.errors import MahavishnuError
from mhv_task._lifecycle import (
    NO_QUALITY_GATE,
    OPEN,
    TERMINAL,
    TRANSITIONS,
    Action,
    Status,
    check,
    plan,
    target,
)
from tests.harness import mhv_code, rpc_error
from tests.task.conftest import People, new_task

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)

# Where each action may start from, as the README states the lifecycle.
ALLOWED = {
    Action.START: {Status.PENDING},
    Action.COMPLETE: {Status.IN_PROGRESS},
    Action.CANCEL: {Status.PENDING, Status.IN_PROGRESS, Status.BLOCKED},
    Action.BLOCK: {Status.PENDING, Status.IN_PROGRESS},
    Action.UNBLOCK: {Status.BLOCKED},
    Action.ASSIGN: {Status.PENDING, Status.IN_PROGRESS, Status.BLOCKED},
    Action.UPDATE: {Status.PENDING, Status.IN_PROGRESS, Status.BLOCKED},
}


def _refusal(action: Action, current: Status) -> str | None:
    try:
        check(action, current)
    except MahavishnuError as exc:
        return exc.code
    return None


def test_terminal_and_open_statuses() -> None:
    assert {Status.COMPLETED, Status.CANCELLED} == TERMINAL
    assert set(Status) == OPEN | TERMINAL
    assert set(TRANSITIONS) == set(Action) - {Action.ASSIGN, Action.UPDATE}


@pytest.mark.parametrize("action", list(Action))
def test_each_action_runs_only_from_its_statuses(action: Action) -> None:
    for current in Status:
        code = _refusal(action, current)
        if current in ALLOWED[action]:
            assert code is None, (action, current)
        elif current == Status.COMPLETED:
            assert code == "MHV-104", (action, current)
        elif current == Status.BLOCKED and action in (Action.START, Action.COMPLETE, Action.BLOCK):
            assert code == "MHV-105", (action, current)
        else:
            assert code == "MHV-106", (action, current)


def test_refusals_say_what_the_action_needs() -> None:
    with pytest.raises(MahavishnuError, match="needs a task that is: pending"):
        check(Action.START, Status.CANCELLED)


@pytest.mark.parametrize(
    ("action", "current", "before", "after"),
    [
        (Action.START, Status.PENDING, None, Status.IN_PROGRESS),
        (Action.COMPLETE, Status.IN_PROGRESS, None, Status.COMPLETED),
        (Action.CANCEL, Status.BLOCKED, Status.IN_PROGRESS, Status.CANCELLED),
        (Action.BLOCK, Status.IN_PROGRESS, None, Status.BLOCKED),
        (Action.UNBLOCK, Status.BLOCKED, Status.IN_PROGRESS, Status.IN_PROGRESS),
        (Action.UNBLOCK, Status.BLOCKED, Status.PENDING, Status.PENDING),
        # Blocked before the status was remembered: back to the start.
        (Action.UNBLOCK, Status.BLOCKED, None, Status.PENDING),
    ],
)
def test_targets(action: Action, current: Status, before: Status | None, after: Status) -> None:
    assert target(action, current, before) == after
    assert plan(action, current, before_block=before, now=NOW).status == after


def test_start_records_when() -> None:
    change = plan(Action.START, Status.PENDING, before_block=None, now=NOW)
    assert change.changes == {"status": "in_progress", "started_at": NOW}
    assert change.details == {"status": {"old": "pending", "new": "in_progress"}}


def test_complete_records_the_gate_or_a_failed_empty_one() -> None:
    gate = {"passed": True, "checks_run": 2, "checks": [{"name": "ci", "passed": True}]}
    done = plan(Action.COMPLETE, Status.IN_PROGRESS, before_block=None, now=NOW, quality_gate=gate)
    assert done.changes == {"status": "completed", "completed_at": NOW, "quality_gate": gate}
    assert done.details["quality_gate_passed"] is True
    assert done.details["checks_run"] == 2
    bare = plan(Action.COMPLETE, Status.IN_PROGRESS, before_block=None, now=NOW)
    assert bare.changes["quality_gate"] == dict(NO_QUALITY_GATE)
    assert (bare.details["quality_gate_passed"], bare.details["checks_run"]) == (False, 0)


def test_a_gate_that_did_not_run_is_recorded_as_not_run() -> None:
    gate = {"passed": False, "checks_run": 0, "checks": [], "not_run": True}
    done = plan(Action.COMPLETE, Status.IN_PROGRESS, before_block=None, now=NOW, quality_gate=gate)
    assert done.changes["quality_gate"] == gate
    # Neither a pass nor a failure: the audit details say that no gate ran.
    assert done.details == {
        "status": {"old": "in_progress", "new": "completed"},
        "quality_gate": "not_run",
    }


def test_block_remembers_the_status_and_unblock_forgets_it() -> None:
    blocked = plan(Action.BLOCK, Status.IN_PROGRESS, before_block=None, now=NOW, reason="review")
    assert blocked.changes == {
        "status": "blocked",
        "blocked_reason": "review",
        "status_before_block": "in_progress",
    }
    assert blocked.details["reason"] == "review"
    unblocked = plan(Action.UNBLOCK, Status.BLOCKED, before_block=Status.IN_PROGRESS, now=NOW)
    assert unblocked.changes == {
        "status": "in_progress",
        "blocked_reason": None,
        "status_before_block": None,
    }


def test_cancel_clears_the_block_and_keeps_the_reason() -> None:
    cancelled = plan(
        Action.CANCEL, Status.BLOCKED, before_block=Status.PENDING, now=NOW, reason="dup"
    )
    assert cancelled.changes == {
        "status": "cancelled",
        "cancel_reason": "dup",
        "status_before_block": None,
        "blocked_reason": None,
    }
    # No reason is stored as none, and said as "".
    silent = plan(Action.CANCEL, Status.PENDING, before_block=None, now=NOW)
    assert silent.changes["cancel_reason"] is None
    assert silent.details["reason"] == ""


def test_plan_refuses_what_check_refuses() -> None:
    with pytest.raises(MahavishnuError) as refused:
        plan(Action.COMPLETE, Status.PENDING, before_block=None, now=NOW)
    assert refused.value.code == "MHV-106"


# --- through the service ------------------------------------------------------------------------


async def test_lifecycle_happy_path_and_quality_gate(
    tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    task = await new_task(tasks, people.alice)
    md = people.alice.md()
    started = await tasks.StartTask(
        task_pb2.StartTaskRequest(id=task.id, etag=task.etag), metadata=md
    )
    assert started.status == task_pb2.TASK_STATUS_IN_PROGRESS
    assert started.HasField("start_time")
    blocked = await tasks.BlockTask(
        task_pb2.BlockTaskRequest(id=task.id, reason="waiting on review"), metadata=md
    )
    assert blocked.status == task_pb2.TASK_STATUS_BLOCKED
    assert blocked.blocked_reason == "waiting on review"
    unblocked = await tasks.UnblockTask(task_pb2.UnblockTaskRequest(id=task.id), metadata=md)
    assert unblocked.status == task_pb2.TASK_STATUS_IN_PROGRESS  # back where it was
    assert unblocked.blocked_reason == ""
    gate = task_pb2.QualityGateResult(
        passed=True,
        checks_run=2,
        checks=[
            task_pb2.QualityCheck(name="tests", passed=True),
            task_pb2.QualityCheck(name="lint", passed=True, detail="0 findings"),
        ],
    )
    done = await tasks.CompleteTask(
        task_pb2.CompleteTaskRequest(id=task.id, quality_gate=gate), metadata=md
    )
    assert done.status == task_pb2.TASK_STATUS_COMPLETED
    assert done.quality_gate == gate
    assert done.HasField("complete_time")


@pytest.mark.parametrize(
    ("setup", "action", "code"),
    [
        (["start", "complete"], "complete", "MHV-104"),
        (["start", "complete"], "start", "MHV-104"),
        (["start", "complete"], "cancel", "MHV-104"),
        (["block"], "start", "MHV-105"),
        (["block"], "complete", "MHV-105"),
        ([], "complete", "MHV-106"),
        (["start"], "start", "MHV-106"),
        (["cancel"], "start", "MHV-106"),
        ([], "unblock", "MHV-106"),
        (["cancel"], "cancel", "MHV-106"),
    ],
)
async def test_illegal_transitions_are_failed_precondition(
    tasks: task_pb2_grpc.TaskServiceStub,
    people: People,
    db: asyncpg.Connection,
    setup: list[str],
    action: str,
    code: str,
) -> None:
    task = await new_task(tasks, people.alice)
    md = people.alice.md()
    calls = {
        "start": lambda: tasks.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=md),
        "complete": lambda: tasks.CompleteTask(
            task_pb2.CompleteTaskRequest(id=task.id), metadata=md
        ),
        "cancel": lambda: tasks.CancelTask(task_pb2.CancelTaskRequest(id=task.id), metadata=md),
        "block": lambda: tasks.BlockTask(task_pb2.BlockTaskRequest(id=task.id), metadata=md),
        "unblock": lambda: tasks.UnblockTask(task_pb2.UnblockTaskRequest(id=task.id), metadata=md),
    }
    for step in setup:
        await calls[step]()
    events = await db.fetchval("SELECT count(*) FROM task.outbox WHERE task_id = $1", task.id)
    error = await rpc_error(calls[action]())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mhv_code(error) == code
    # A refused change leaves no trace.
    assert (
        await db.fetchval("SELECT count(*) FROM task.outbox WHERE task_id = $1", task.id) == events
    )
