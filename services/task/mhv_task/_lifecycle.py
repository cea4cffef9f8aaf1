"""The task lifecycle: which status changes are allowed, and the error for those that are not.

    pending --start--> in_progress --complete--> completed
       |  ^                |  ^
     block|unblock       block|unblock          (unblock returns to the status before block)
       v  |                v  |
      blocked ------------ blocked
    pending / in_progress / blocked --cancel--> cancelled

Completed and cancelled are terminal: nothing but reads and deletion touches them.
"""

from __future__ import annotations

import enum

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
