"""The task lifecycle: which status changes are allowed, what each one writes, and why not.

    pending --start--> in_progress --complete--> completed
       |  ^                |  ^
     block|unblock       block|unblock          (unblock returns to the status before block)
       v  |                v  |
      blocked ------------ blocked
    pending / in_progress / blocked --cancel--> cancelled

Completed and cancelled are terminal: nothing but reads and deletion touches them. Everything
here is pure: the domain (`mhv_task._tasks`) reads the task, asks `plan` what the transition
writes, and stores it with its event.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mhv_common.errors import (
    InvalidTaskTransitionError,
    MahavishnuError,
    TaskAlreadyCompletedError,
    TaskBlockedError,
)


class Status(enum.StrEnum):
    """A task's status, as stored."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"


class Action(enum.StrEnum):
    """A lifecycle operation, named after its RPC."""

    START = "start"
    COMPLETE = "complete"
    CANCEL = "cancel"
    BLOCK = "block"
    UNBLOCK = "unblock"
    ASSIGN = "assign"
    UPDATE = "update"


TERMINAL = frozenset({Status.COMPLETED, Status.CANCELLED})
OPEN = frozenset(Status) - TERMINAL

# Where each action may start from.
_ALLOWED: dict[Action, frozenset[Status]] = {
    Action.START: frozenset({Status.PENDING}),
    Action.COMPLETE: frozenset({Status.IN_PROGRESS}),
    Action.CANCEL: OPEN,
    Action.BLOCK: frozenset({Status.PENDING, Status.IN_PROGRESS}),
    Action.UNBLOCK: frozenset({Status.BLOCKED}),
    Action.ASSIGN: OPEN,
    Action.UPDATE: OPEN,
}

# The actions that move a task to another status.
TRANSITIONS = (Action.START, Action.COMPLETE, Action.CANCEL, Action.BLOCK, Action.UNBLOCK)

NO_QUALITY_GATE: Mapping[str, Any] = {"passed": False, "checks_run": 0, "checks": []}


def check(action: Action, current: Status) -> None:
    """Raise the FAILED_PRECONDITION error that explains why `action` cannot run now."""
    if current in _ALLOWED[action]:
        return
    raise _refusal(action, current)


def _refusal(action: Action, current: Status) -> MahavishnuError:
    if current == Status.COMPLETED:
        return TaskAlreadyCompletedError(f"The task is already completed; it cannot {action}.")
    if current == Status.BLOCKED and action in (Action.START, Action.COMPLETE, Action.BLOCK):
        return TaskBlockedError(f"The task is blocked; unblock it before you {action} it.")
    allowed = ", ".join(sorted(_ALLOWED[action]))
    return InvalidTaskTransitionError(
        f"Cannot {action} a task that is {current}; {action} needs a task that is: {allowed}."
    )


def target(action: Action, current: Status, before_block: Status | None) -> Status:
    """The status after `action` (which `check` allowed)."""
    if action == Action.START:
        return Status.IN_PROGRESS
    if action == Action.COMPLETE:
        return Status.COMPLETED
    if action == Action.CANCEL:
        return Status.CANCELLED
    if action == Action.BLOCK:
        return Status.BLOCKED
    if action == Action.UNBLOCK:
        return before_block or Status.PENDING
    return current


@dataclass(frozen=True, slots=True)
class Transition:
    """What a lifecycle change writes.

    Attributes:
        status: The status the task moves to.
        changes: Column -> new value, the status included.
        details: The details of the change's audit event.
    """

    status: Status
    changes: dict[str, Any]
    details: dict[str, Any]


def plan(
    action: Action,
    current: Status,
    *,
    before_block: Status | None,
    now: dt.datetime,
    reason: str = "",
    quality_gate: Mapping[str, Any] | None = None,
) -> Transition:
    """What `action` writes to a task that is `current`.

    Args:
        action: One of `TRANSITIONS`.
        current: The task's status now.
        before_block: The status it had when it was blocked (None unless blocked).
        now: The time of the change, for ``started_at`` and ``completed_at``.
        reason: Why it is cancelled or blocked ("" for none).
        quality_gate: The quality-gate result a completion records (none: a failed, empty
            gate; ``not_run``: no gate ran, and the audit details say so).

    Raises:
        MahavishnuError: The action is not allowed from `current` (FAILED_PRECONDITION).
    """
    check(action, current)
    new = target(action, current, before_block)
    changes: dict[str, Any] = {"status": new.value}
    details: dict[str, Any] = {"status": {"old": current.value, "new": new.value}}
    if action == Action.START:
        changes["started_at"] = now
    elif action == Action.COMPLETE:
        gate = dict(quality_gate or NO_QUALITY_GATE)
        changes.update(completed_at=now, quality_gate=gate)
        if gate.get("not_run"):
            # No gate ran: the record says so rather than showing a pass or a failure.
            details["quality_gate"] = "not_run"
        else:
            details.update(
                quality_gate_passed=bool(gate.get("passed")),
                checks_run=int(gate.get("checks_run", 0)),
            )
    elif action == Action.CANCEL:
        changes.update(cancel_reason=reason or None, status_before_block=None, blocked_reason=None)
        details["reason"] = reason
    elif action == Action.BLOCK:
        changes.update(blocked_reason=reason or None, status_before_block=current.value)
        details["reason"] = reason
    elif action == Action.UNBLOCK:
        changes.update(blocked_reason=None, status_before_block=None)
    return Transition(new, changes, details)
