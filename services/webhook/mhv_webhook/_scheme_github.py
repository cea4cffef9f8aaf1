"""GitHub (``scheme: github``): how it signs, what its deliveries say, what they change.

Authentication: ``X-Hub-Signature-256: sha256=<hex>`` = HMAC-SHA256(secret, body). Neither the
delivery id nor a timestamp is signed, so there is no freshness check; replay protection is the
delivery id (``X-GitHub-Delivery``) and the body's SHA-256, both remembered for the dedup
retention (days).

Content types: ``application/json``, or ``application/x-www-form-urlencoded`` with the JSON in
the ``payload`` field (a hook setting); the signature covers the body as sent.

Task changes: every ``issues`` action has a defined effect (`ACTIONS`, `IGNORED_ACTIONS`);
other events are stored and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import ConfigurationError, WebhookSignatureInvalidError
from mhv_webhook._changes import (
    DESCRIPTION_LIMIT,
    NAME_LIMIT,
    TITLE_LIMIT,
    Change,
    IgnoredEvent,
    Kind,
    Missing,
    TaskChange,
    cut,
    login,
    logins,
    names,
    sender_time,
    username,
    usernames,
)
from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import (
    DELIVERY_ID,
    EVENT,
    BodyFormat,
    FreshnessWindow,
    Verified,
    Verifier,
    active_secrets,
    body_digest,
    printable,
    required_header,
)
from mhv_webhook._secrets import Secret


class GitHubVerifier:
    """HMAC-SHA256 of the body in ``X-Hub-Signature-256``, with one source's secrets."""

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self._secrets = tuple(secrets)

    def key_labels(self) -> tuple[str, ...]:
        """One label per configured secret."""
        return tuple(s.label for s in self._secrets)

    def precheck(self, headers: HeaderView, *, now: float) -> None:
        """The signature header is there and well formed."""
        self._given(headers)

    @staticmethod
    def _given(headers: HeaderView) -> bytes:
        header = headers.get("x-hub-signature-256")
        if not header:
            raise WebhookSignatureInvalidError("The X-Hub-Signature-256 header is missing.")
        algorithm, _, hex_digest = header.partition("=")
        try:
            given = bytes.fromhex(hex_digest) if algorithm == "sha256" else b""
        except ValueError:
            given = b""
        if len(given) != hashlib.sha256().digest_size:
            raise WebhookSignatureInvalidError(
                "The X-Hub-Signature-256 header must be sha256=<64 hex digits>."
            )
        return given

    def verify(self, headers: HeaderView, body: bytes, *, now: float) -> Verified:
        """Check the body signature; the delivery id and event come from headers."""
        given = self._given(headers)
        label = None
        for secret in active_secrets(self._secrets, now):
            if hmac.compare_digest(hmac.new(secret.key, body, hashlib.sha256).digest(), given):
                label = secret.label
                break
        if label is None:
            raise WebhookSignatureInvalidError()
        delivery = required_header(headers, "x-github-delivery", DELIVERY_ID, "delivery id")
        event = required_header(headers, "x-github-event", EVENT, "event name")
        return Verified(delivery, event, (label,), (("delivery_id", delivery), body_digest(body)))


# What each ``issues`` action does to the issue's task (docs/webhooks/processing.md).
ACTIONS: Mapping[str, Kind] = MappingProxyType(
    {
        "opened": Kind.OPENED,
        "reopened": Kind.OPENED,
        "edited": Kind.EDITED,
        "assigned": Kind.EDITED,
        "unassigned": Kind.EDITED,
        "labeled": Kind.EDITED,
        "unlabeled": Kind.EDITED,
        "milestoned": Kind.EDITED,
        "demilestoned": Kind.EDITED,
        "typed": Kind.EDITED,
        "untyped": Kind.EDITED,
        "closed": Kind.CLOSED,
        "deleted": Kind.DELETED,
        "transferred": Kind.TRANSFERRED,
    }
)
# Actions that change nothing a task holds, ignored on purpose, and why.
IGNORED_ACTIONS: Mapping[str, str] = MappingProxyType(
    {
        "pinned": "pinning changes where GitHub lists the issue, not the work",
        "unpinned": "pinning changes where GitHub lists the issue, not the work",
        "locked": "locking closes the issue's conversation, not the work",
        "unlocked": "locking closes the issue's conversation, not the work",
    }
)


class GitHub:
    """The ``github`` scheme."""

    name = "github"
    kept_headers: tuple[str, ...] = (
        "content-type",
        "user-agent",
        "x-github-hook-id",
        "x-github-hook-installation-target-id",
        "x-github-hook-installation-target-type",
    )
    # A hook's content type is application/json or application/x-www-form-urlencoded.
    body_formats: tuple[BodyFormat, ...] = (BodyFormat.JSON, BodyFormat.FORM)

    def verifier(
        self, secrets: Sequence[Secret], *, window: FreshnessWindow, variable: str
    ) -> Verifier:
        """Plain secrets only: GitHub signs with the secret text as entered."""
        if any(s.signing_key for s in secrets):
            raise ConfigurationError(
                f"{variable}: GitHub signs with the secret text as entered; "
                "remove the whsec_ prefix."
            )
        return GitHubVerifier(secrets)

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """Event from ``X-GitHub-Event``, action from the body's ``action``."""
        return verified.event, printable(payload.get("action"))

    def check(
        self, *, event: str, payload: Mapping[str, Any], repositories: RepositoryCatalog
    ) -> None:
        """Nothing beyond a JSON object: GitHub's payloads are GitHub's to shape."""

    def interpret(
        self,
        *,
        source: str,
        event: str,
        payload: Mapping[str, Any],
        repositories: RepositoryCatalog,
    ) -> Change:
        """An ``issues`` event's change to the issue's task."""
        if event != "issues":
            return IgnoredEvent(f"GitHub event {event!r} does not change tasks")
        action = payload.get("action")
        if isinstance(action, str) and action in IGNORED_ACTIONS:
            return IgnoredEvent(f"GitHub issues action {action!r}: {IGNORED_ACTIONS[action]}")
        kind = ACTIONS.get(action) if isinstance(action, str) else None
        if kind is None:
            return IgnoredEvent(f"GitHub issues action {action!r} has no defined task effect")
        issue = payload.get("issue")
        repo = payload.get("repository")
        if not isinstance(issue, dict) or not isinstance(repo, dict):
            return IgnoredEvent("GitHub issues event without issue or repository")
        key = _issue_key(repo, issue)
        if key is None:
            return IgnoredEvent("GitHub issues event without repository name or issue number")
        configured = repositories.by_external(github=repo["full_name"])
        if configured is None:
            return IgnoredEvent(f"GitHub repository {repo['full_name']!r} is not configured")
        actor = login(payload.get("sender")) or login(issue.get("user"))
        if not actor:
            return IgnoredEvent("GitHub issues event without a sender")
        assignees = logins(issue.get("assignees"))
        if assignees is None and action == "assigned":
            assignees = (login(payload.get("assignee")),)
        change = TaskChange(
            kind=kind,
            source=source,
            external_key=key,
            repository=configured.name,
            actor=username(source, actor),
            title=cut(issue.get("title"), TITLE_LIMIT),
            description=cut(issue.get("body"), DESCRIPTION_LIMIT),
            metadata=_metadata(source, key, issue),
            assignees=usernames(source, assignees),
            happened_at=sender_time(issue.get("updated_at")),
        )
        changes = payload.get("changes")
        changes = changes if isinstance(changes, dict) else {}
        if kind == Kind.CLOSED:
            return replace(change, cancel_reason=_closing_reason(issue.get("state_reason")))
        if kind == Kind.DELETED:
            return replace(change, cancel_reason="issue deleted on GitHub", missing=Missing.IGNORE)
        if kind == Kind.OPENED:
            # An issue transferred here: its task, if the old issue had one, moves with it.
            old_repo, old_issue = changes.get("old_repository"), changes.get("old_issue")
            if isinstance(old_repo, dict) and isinstance(old_issue, dict):
                return replace(change, moved_from=_issue_key(old_repo, old_issue))
            return change
        if kind == Kind.TRANSFERRED:
            return _transferred(change, changes, repositories) or IgnoredEvent(
                "GitHub transferred event without the new issue and repository"
            )
        return change


def _issue_key(repo: Mapping[str, Any], issue: Mapping[str, Any]) -> str | None:
    full_name, number = repo.get("full_name"), issue.get("number")
    if not isinstance(full_name, str) or not isinstance(number, int):
        return None
    return f"{full_name}#{number}"


def _closing_reason(state_reason: Any) -> str:
    """Empty (complete the task) for a completed issue, else why the task is cancelled."""
    if state_reason in (None, "completed"):
        return ""
    if state_reason == "not_planned":
        return "issue closed as not planned"
    if state_reason == "duplicate":
        return "issue closed as a duplicate"
    return f"issue closed ({printable(state_reason) or 'for another reason'})"


def _metadata(source: str, key: str, issue: Mapping[str, Any]) -> dict[str, Any]:
    """The task metadata an issue sets: where it comes from, labels, milestone."""
    origin: dict[str, Any] = {"source": source, "key": key}
    url = cut(issue.get("html_url"), 500)
    if url:
        origin["url"] = url
    kind = issue.get("type")
    if isinstance(kind, dict) and cut(kind.get("name"), NAME_LIMIT):
        origin["type"] = cut(kind.get("name"), NAME_LIMIT)
    metadata: dict[str, Any] = {"origin": origin}
    labels = names(issue.get("labels"), "name")
    if labels is not None:
        metadata["labels"] = labels
    if "milestone" in issue:
        milestone = issue["milestone"]
        metadata["milestone"] = (
            {"title": cut(milestone.get("title"), NAME_LIMIT), "number": milestone.get("number")}
            if isinstance(milestone, dict)
            else None
        )
    return metadata


def _transferred(
    change: TaskChange, changes: Mapping[str, Any], repositories: RepositoryCatalog
) -> TaskChange | None:
    """The task follows the issue to its new repository, or is cancelled if that is unknown."""
    new_repo, new_issue = changes.get("new_repository"), changes.get("new_issue")
    if not isinstance(new_repo, dict) or not isinstance(new_issue, dict):
        return None
    new_key = _issue_key(new_repo, new_issue)
    if new_key is None:
        return None
    destination = repositories.by_external(github=new_repo["full_name"])
    return replace(
        change,
        external_key=new_key,
        moved_from=change.external_key,
        repository=destination.name if destination is not None else None,
        metadata=_metadata(change.source, new_key, new_issue),
        cancel_reason=(
            "" if destination else f"issue transferred to {new_key}, which is not configured here"
        ),
        missing=Missing.IGNORE,
    )


SCHEME = GitHub()
