"""What a delivery asks for: sender payloads mapped to task changes.

GitHub ``issues`` events (opened, edited, closed, reopened, assigned) and GitLab issue events
(open, update, close, reopen, and assignee changes) become an `IssueChange`; everything else
is stored and marked ignored, with the reason.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from mhv_common.config import RepositoryCatalog

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


def _login(value: Any) -> str:
    if isinstance(value, dict):
        login = value.get("login") or value.get("username")
        if isinstance(login, str):
            return login
    return ""


def username(source: str, login: str) -> str:
    """Our username for a sender's account: ``<source>.<login>``, cut to 100 characters."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in login)
    return f"{source}.{cleaned}"[:100]


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def interpret(
    *, scheme: str, source: str, event: str, body: bytes, repositories: RepositoryCatalog
) -> IssueChange | IgnoredEvent:
    """Map one stored delivery to the change it asks for."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return IgnoredEvent("body is not JSON")
    if not isinstance(payload, dict):
        return IgnoredEvent("body is not a JSON object")
    if scheme == "github":
        return _github(source, event, payload, repositories)
    if scheme == "gitlab":
        return _gitlab(source, payload, repositories)
    return IgnoredEvent(f"no task mapping for {scheme} events")


_GITHUB_ACTIONS = {
    "opened": Kind.OPENED,
    "edited": Kind.EDITED,
    "closed": Kind.CLOSED,
    "reopened": Kind.REOPENED,
    "assigned": Kind.ASSIGNED,
}


def _github(
    source: str, event: str, payload: dict[str, Any], repositories: RepositoryCatalog
) -> IssueChange | IgnoredEvent:
    if event != "issues":
        return IgnoredEvent(f"GitHub event {event!r} does not change tasks")
    kind = _GITHUB_ACTIONS.get(str(payload.get("action")))
    if kind is None:
        return IgnoredEvent(f"GitHub issues action {payload.get('action')!r} does not change tasks")
    issue = payload.get("issue")
    repo = payload.get("repository")
    if not isinstance(issue, dict) or not isinstance(repo, dict):
        return IgnoredEvent("GitHub issues event without issue or repository")
    full_name = repo.get("full_name")
    number = issue.get("number")
    if not isinstance(full_name, str) or not isinstance(number, int):
        return IgnoredEvent("GitHub issues event without repository name or issue number")
    configured = repositories.by_external(github=full_name)
    if configured is None:
        return IgnoredEvent(f"GitHub repository {full_name!r} is not configured")
    actor = _login(payload.get("sender")) or _login(issue.get("user"))
    if not actor:
        return IgnoredEvent("GitHub issues event without a sender")
    assignee = _login(payload.get("assignee")) if kind == Kind.ASSIGNED else ""
    return IssueChange(
        kind=kind,
        source=source,
        external_key=f"{full_name}#{number}",
        repository=configured.name,
        actor=username(source, actor),
        title=_text(issue.get("title"), TITLE_LIMIT),
        description=_text(issue.get("body"), DESCRIPTION_LIMIT),
        assignee=username(source, assignee) if assignee else None,
        not_planned=issue.get("state_reason") == "not_planned",
    )


_GITLAB_ACTIONS = {
    "open": Kind.OPENED,
    "update": Kind.EDITED,
    "close": Kind.CLOSED,
    "reopen": Kind.REOPENED,
}


def _gitlab(
    source: str, payload: dict[str, Any], repositories: RepositoryCatalog
) -> IssueChange | IgnoredEvent:
    if payload.get("object_kind") != "issue":
        return IgnoredEvent(f"GitLab {payload.get('object_kind')!r} events do not change tasks")
    attributes = payload.get("object_attributes")
    project = payload.get("project")
    if not isinstance(attributes, dict) or not isinstance(project, dict):
        return IgnoredEvent("GitLab issue event without attributes or project")
    kind = _GITLAB_ACTIONS.get(str(attributes.get("action")))
    if kind is None:
        return IgnoredEvent(
            f"GitLab issue action {attributes.get('action')!r} does not change tasks"
        )
    path = project.get("path_with_namespace")
    iid = attributes.get("iid")
    if not isinstance(path, str) or not isinstance(iid, int):
        return IgnoredEvent("GitLab issue event without project path or issue iid")
    configured = repositories.by_external(gitlab=path)
    if configured is None:
        return IgnoredEvent(f"GitLab project {path!r} is not configured")
    actor = _login(payload.get("user"))
    if not actor:
        return IgnoredEvent("GitLab issue event without a user")
    assignee: str | None = None
    changes = payload.get("changes")
    if kind == Kind.EDITED and isinstance(changes, dict) and "assignees" in changes:
        # An update that changed the assignees is an assignment.
        kind = Kind.ASSIGNED
        current = (
            changes["assignees"].get("current") if isinstance(changes["assignees"], dict) else None
        )
        first = current[0] if isinstance(current, list) and current else None
        login = _login(first)
        assignee = username(source, login) if login else None
    return IssueChange(
        kind=kind,
        source=source,
        external_key=f"{path}#{iid}",
        repository=configured.name,
        actor=username(source, actor),
        title=_text(attributes.get("title"), TITLE_LIMIT),
        description=_text(attributes.get("description"), DESCRIPTION_LIMIT),
        assignee=assignee,
        not_planned=False,
    )
