"""What a delivery asks of the task service: the task changes the sender schemes map onto.

A scheme (`mhv_webhook._scheme_github`, ...) reads its senders' payloads and answers with an
`IssueChange` or, for anything that changes no task, an `IgnoredEvent` with the reason, which
the saga records on the delivery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

# Task titles are at most 200 characters and descriptions 5000; longer issue text is cut here
# rather than refused, so that a long issue still becomes a task.
TITLE_LIMIT = 200
DESCRIPTION_LIMIT = 5000


class Kind(enum.StrEnum):
    """The task change an issue event maps to."""

    OPENED = "opened"
    EDITED = "edited"
    CLOSED = "closed"
    REOPENED = "reopened"
    ASSIGNED = "assigned"


@dataclass(frozen=True, slots=True)
class IssueChange:
    """A task change requested by an issue event.

    Attributes:
        kind: What happened to the issue.
        source: The webhook source name.
        external_key: The issue, e.g. ``example/demo#42``.
        repository: The configured repository it maps to.
        actor: Sender's login (the person who made the change), prefixed by source.
        title: Issue title, cut to the task limit.
        description: Issue body, cut to the task limit.
        assignee: For ASSIGNED, the new assignee's login (prefixed), or None to unassign.
        not_planned: For CLOSED, whether it was closed as not planned (task cancelled rather
            than completed).
    """

    kind: Kind
    source: str
    external_key: str
    repository: str
    actor: str
    title: str
    description: str
    assignee: str | None = None
    not_planned: bool = False


@dataclass(frozen=True, slots=True)
class IgnoredEvent:
    """A delivery that maps to no task change, and why."""

    reason: str


Change = IssueChange | IgnoredEvent


def issue_change(
    kind: Kind,
    *,
    source: str,
    external_key: str,
    repository: str,
    actor: str,
    title: Any,
    description: Any,
    assignee: str = "",
    not_planned: bool = False,
) -> IssueChange:
    """An `IssueChange` from a sender's own values.

    Logins (`actor`, `assignee`; empty for none) become our usernames; title and description
    are cut to the task limits, and anything but text becomes empty.
    """
    return IssueChange(
        kind=kind,
        source=source,
        external_key=external_key,
        repository=repository,
        actor=username(source, actor),
        title=cut(title, TITLE_LIMIT),
        description=cut(description, DESCRIPTION_LIMIT),
        assignee=username(source, assignee) if assignee else None,
        not_planned=not_planned,
    )


def login(value: Any) -> str:
    """The account name in a sender's user object (``login`` or ``username``), else empty."""
    if isinstance(value, dict):
        name = value.get("login") or value.get("username")
        if isinstance(name, str):
            return name
    return ""


def username(source: str, login: str) -> str:
    """Our username for a sender's account: ``<source>.<login>``, cut to 100 characters."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in login)
    return f"{source}.{cleaned}"[:100]


def cut(value: Any, limit: int) -> str:
    """A payload string cut to `limit` characters; anything else is empty."""
    return value[:limit] if isinstance(value, str) else ""
