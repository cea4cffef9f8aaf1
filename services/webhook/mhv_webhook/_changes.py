"""What a delivery asks of the task service: the task changes the sender schemes map onto.

A scheme (`mhv_webhook._scheme_github`, ...) reads its senders' payloads and answers with a
`TaskChange` or, for anything that changes no task, an `IgnoredEvent` with the reason, which
the saga records on the delivery. A change names the thing it is about by an external key
(``example/demo#42`` for an issue, the sender's ``external_id`` for a Standard Webhooks task
event); the saga keeps which task stands for each key.

The same words serve every sender, so that the same change on GitHub and on GitLab has the
same effect:

- `Kind` says what happened: opened (or reopened), edited, closed, deleted, transferred;
- the fields say what the task should look like afterwards: title, description, the metadata
  the gateway keeps (``origin``, ``labels``, ``milestone``), the assignee, a new repository;
  a field left None is not touched;
- `Missing` says what to do when the key has no task yet.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Task titles are at most 200 characters and descriptions 5000; longer issue text is cut here
# rather than refused, so that a long issue still becomes a task.
TITLE_LIMIT = 200
DESCRIPTION_LIMIT = 5000
# Bounds on what the gateway writes into a task's metadata (the task service allows 16 KiB).
LABELS_LIMIT = 50
NAME_LIMIT = 100
# Usernames are at most 100 characters: letters, digits, '.', '_' and '-'.
USERNAME_LIMIT = 100


class Kind(enum.StrEnum):
    """What happened to the thing a task stands for."""

    # Opened or reopened: the task exists and is open (a new task when the linked one has
    # ended: completed and cancelled are final), and follows the snapshot.
    OPENED = "opened"
    # Changed while open: the task follows the snapshot (text, labels, assignee, ...).
    EDITED = "edited"
    # Closed: the task is completed (no quality gate ran, unless the sender reports one) or,
    # with a `cancel_reason`, cancelled.
    CLOSED = "closed"
    # Deleted at the sender: the task is cancelled with the reason.
    DELETED = "deleted"
    # Moved to another repository: the task follows it there, or is cancelled with the reason
    # when that repository is not configured here.
    TRANSFERRED = "transferred"

    @property
    def changes_state(self) -> bool:
        """Whether the change opens or ends the task (applied in the order they happened)."""
        return self in (Kind.OPENED, Kind.CLOSED, Kind.DELETED)


class Missing(enum.StrEnum):
    """What a change does when its key has no task (or only a deleted one)."""

    # Create the task from the change's snapshot (issue events: the hook may have been
    # added after the issue was opened).
    CREATE = "create"
    # Nothing to change: the delivery is ignored (a deleted issue never seen before).
    IGNORE = "ignore"
    # The creating event may still be on its way: try again later (Standard Webhooks task
    # events, which address a task created by an earlier event).
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class QualityGate:
    """A quality-gate result a sender reports with a completion.

    Attributes:
        passed: Whether the gate passed.
        checks_run: How many checks ran.
        checks: (name, passed, detail) of each check.
    """

    passed: bool
    checks_run: int = 0
    checks: tuple[tuple[str, bool, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TaskChange:
    """A task change requested by a delivery.

    Attributes:
        kind: What happened.
        source: The webhook source name.
        external_key: What the task stands for, e.g. ``example/demo#42``.
        repository: The configured repository the task belongs in, or None when the
            thing moved to a repository that is not configured here.
        actor: Our username of the person who made the change (``<source>.<login>``).
        title: The title, cut to the task limit; None leaves it.
        description: The description, cut to the task limit; None leaves it.
        metadata: Task metadata keys to set (a None value removes the key); other keys of
            the task's metadata are kept.
        assignees: Our usernames of the assignees, in the sender's order (the task takes the
            first; empty unassigns); None when the sender did not say.
        priority: ``low``, ``medium``, ``high`` or ``critical``; None leaves it.
        deadline: An ISO 8601 date-time; None leaves it.
        cancel_reason: For CLOSED, DELETED and TRANSFERRED: cancel the task, saying why
            (empty: a CLOSED task is completed).
        quality_gate: For CLOSED: the gate the sender reports; None when no gate ran.
        moved_from: The external key the thing had before a transfer.
        happened_at: When the sender says it happened; orders state changes.
        missing: What to do when the key has no task.
    """

    kind: Kind
    source: str
    external_key: str
    repository: str | None
    actor: str
    title: str | None = None
    description: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    assignees: tuple[str, ...] | None = None
    priority: str | None = None
    deadline: str | None = None
    cancel_reason: str = ""
    quality_gate: QualityGate | None = None
    moved_from: str | None = None
    happened_at: dt.datetime | None = None
    missing: Missing = Missing.CREATE


@dataclass(frozen=True, slots=True)
class IgnoredEvent:
    """A delivery that maps to no task change, and why."""

    reason: str


Change = TaskChange | IgnoredEvent


def merged_metadata(current: Mapping[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    """`current` with `keys` set (a None value removes its key)."""
    merged = dict(current)
    for key, value in keys.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def login(value: Any) -> str:
    """The account name in a sender's user object (``login`` or ``username``), else empty."""
    if isinstance(value, dict):
        name = value.get("login") or value.get("username")
        if isinstance(name, str):
            return name
    return ""


def logins(values: Any) -> tuple[str, ...] | None:
    """The account names of a list of user objects; None when `values` is not a list."""
    if not isinstance(values, list):
        return None
    return tuple(name for name in (login(v) for v in values) if name)


def username(source: str, login: str) -> str:
    """Our username for a sender's account: ``<source>.<login>``, cut to 100 characters."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in login)
    return f"{source}.{cleaned}"[:USERNAME_LIMIT]


def usernames(source: str, accounts: Sequence[str] | None) -> tuple[str, ...] | None:
    """`username` of each account; None stays None (the sender did not say)."""
    return None if accounts is None else tuple(username(source, a) for a in accounts)


def cut(value: Any, limit: int) -> str:
    """A payload string cut to `limit` characters; anything else is empty."""
    return value[:limit] if isinstance(value, str) else ""


def names(values: Any, key: str) -> list[str] | None:
    """The `key` text of each object in a list (label names), bounded; None if not a list."""
    if not isinstance(values, list):
        return None
    found = [cut(v.get(key), NAME_LIMIT) for v in values if isinstance(v, dict)]
    return [n for n in found if n][:LABELS_LIMIT]


def sender_time(value: Any) -> dt.datetime | None:
    """A sender's timestamp (ISO 8601, or GitLab's ``2017-09-15 16:52:00 UTC``), else None."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().upper()
    if text.endswith(" UTC"):
        text = text[: -len(" UTC")].replace(" ", "T") + "+00:00"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)
