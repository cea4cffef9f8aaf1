"""GitLab (``scheme: gitlab``): how it authenticates, what its deliveries say, what they change.

Authentication: ``X-Gitlab-Token`` (a shared secret sent as is) and/or GitLab's signing token,
which follows Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``;
see `mhv_webhook._scheme_standard`). Plain secrets check the token, ``whsec_`` secrets the
signature; with both kinds configured both must pass. The delivery id is the signed
``webhook-id``, else ``Idempotency-Key``, else ``X-Gitlab-Event-UUID``.

Task changes: issue events (``object_kind: issue``, ``Issue Hook`` and ``Confidential Issue
Hook``), every action with a defined effect (`ACTIONS`); everything else is stored and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import FieldViolation, ValidationError, WebhookSignatureInvalidError
from mhv_webhook._changes import (
    DESCRIPTION_LIMIT,
    NAME_LIMIT,
    TITLE_LIMIT,
    Change,
    IgnoredEvent,
    Kind,
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
    checked_delivery_id,
    printable,
    required_header,
)
from mhv_webhook._scheme_standard import precheck_signature, verify_signature
from mhv_webhook._secrets import Secret


class GitLabVerifier:
    """Secret token and/or signing token, with one source's secrets."""

    def __init__(self, secrets: Sequence[Secret], *, window: FreshnessWindow) -> None:
        self._tokens = tuple(s for s in secrets if not s.signing_key)
        self._signing = tuple(s for s in secrets if s.signing_key)
        self._window = window

    def key_labels(self) -> tuple[str, ...]:
        """``token:<label>`` and ``signing:<label>`` per configured secret."""
        return tuple(f"token:{s.label}" for s in self._tokens) + tuple(
            f"signing:{s.label}" for s in self._signing
        )

    def precheck(self, headers: HeaderView, *, now: float) -> None:
        """The secret token in full (it does not depend on the body), and the signing headers."""
        self._token_label(headers, now)
        if self._signing:
            precheck_signature(headers, now=now, window=self._window)

    def _token_label(self, headers: HeaderView, now: float) -> str | None:
        if not self._tokens:
            return None
        token = headers.get("x-gitlab-token")
        if not token:
            raise WebhookSignatureInvalidError("The X-Gitlab-Token header is missing.")
        # Compare digests so the comparison takes the same time whatever the lengths.
        given = hashlib.sha256(token.encode("utf-8")).digest()
        for secret in active_secrets(self._tokens, now):
            if hmac.compare_digest(hashlib.sha256(secret.key).digest(), given):
                return secret.label
        raise WebhookSignatureInvalidError()

    def verify(self, headers: HeaderView, body: bytes, *, now: float) -> Verified:
        """Check the configured token kinds; dedup on the signed id or the delivery headers."""
        labels: list[str] = []
        token_label = self._token_label(headers, now)
        if token_label is not None:
            labels.append(f"token:{token_label}")
        idempotency_key = headers.get("idempotency-key") or None
        dedup: tuple[tuple[str, str], ...]
        if self._signing:
            msg_id, label = verify_signature(
                headers, body, self._signing, now=now, window=self._window
            )
            labels.append(f"signing:{label}")
            if idempotency_key is not None and idempotency_key != msg_id:
                raise ValidationError(
                    "The Idempotency-Key and webhook-id headers differ.",
                    violations=[FieldViolation("idempotency-key", "must equal webhook-id")],
                )
            delivery = checked_delivery_id(msg_id, "webhook-id")
            dedup = (("delivery_id", delivery),)
        else:
            name = "idempotency-key" if idempotency_key is not None else "x-gitlab-event-uuid"
            delivery = required_header(headers, name, DELIVERY_ID, "delivery id")
            # The token does not sign the body: remember the body too, so a captured request
            # resent under another id is still recognised.
            dedup = (("delivery_id", delivery), body_digest(body))
        event = headers.get("x-gitlab-event") or ""
        if event and not EVENT.match(event):
            raise ValidationError(
                "The X-Gitlab-Event header is not a valid event name.",
                violations=[FieldViolation("x-gitlab-event", "1-200 printable characters")],
            )
        return Verified(delivery, event, tuple(labels), dedup)


# What each Issue Hook ``object_attributes.action`` does to the issue's task
# (docs/webhooks/processing.md). An update carries the whole issue: the task follows its
# title, description, labels, milestone and assignees, whatever ``changes`` names.
ACTIONS: Mapping[str, Kind] = MappingProxyType(
    {
        "open": Kind.OPENED,
        "reopen": Kind.OPENED,
        "update": Kind.EDITED,
        "close": Kind.CLOSED,
    }
)


class GitLab:
    """The ``gitlab`` scheme."""

    name = "gitlab"
    kept_headers: tuple[str, ...] = (
        "content-type",
        "user-agent",
        "x-gitlab-instance",
        "x-gitlab-webhook-uuid",
        "x-gitlab-event-uuid",
        "idempotency-key",
    )
    body_formats: tuple[BodyFormat, ...] = (BodyFormat.JSON,)

    def verifier(
        self, secrets: Sequence[Secret], *, window: FreshnessWindow, variable: str
    ) -> Verifier:
        """Secret tokens (plain secrets), signing tokens (``whsec_``), or both."""
        return GitLabVerifier(secrets, window=window)

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """Event from ``X-Gitlab-Event`` (else ``object_kind``), action from the attributes."""
        attributes = payload.get("object_attributes")
        action = printable(attributes.get("action")) if isinstance(attributes, dict) else ""
        return verified.event or printable(payload.get("object_kind")), action

    def check(
        self, *, event: str, payload: Mapping[str, Any], repositories: RepositoryCatalog
    ) -> None:
        """Nothing beyond a JSON object: GitLab's payloads are GitLab's to shape."""

    def interpret(
        self,
        *,
        source: str,
        event: str,
        payload: Mapping[str, Any],
        repositories: RepositoryCatalog,
    ) -> Change:
        """An issue event's change to the issue's task (confidential issues alike)."""
        kind_of_object = payload.get("object_kind")
        if kind_of_object == "work_item":
            return IgnoredEvent("GitLab work items other than issues do not change tasks")
        if kind_of_object != "issue":
            return IgnoredEvent(f"GitLab {kind_of_object!r} events do not change tasks")
        attributes = payload.get("object_attributes")
        project = payload.get("project")
        if not isinstance(attributes, dict) or not isinstance(project, dict):
            return IgnoredEvent("GitLab issue event without attributes or project")
        action = attributes.get("action")
        kind = ACTIONS.get(action) if isinstance(action, str) else None
        if kind is None:
            return IgnoredEvent(f"GitLab issue action {action!r} has no defined task effect")
        path = project.get("path_with_namespace")
        iid = attributes.get("iid")
        if not isinstance(path, str) or not isinstance(iid, int):
            return IgnoredEvent("GitLab issue event without project path or issue iid")
        configured = repositories.by_external(gitlab=path)
        if configured is None:
            return IgnoredEvent(f"GitLab project {path!r} is not configured")
        actor = login(payload.get("user"))
        if not actor:
            return IgnoredEvent("GitLab issue event without a user")
        key = f"{path}#{iid}"
        return TaskChange(
            kind=kind,
            source=source,
            external_key=key,
            repository=configured.name,
            actor=username(source, actor),
            title=cut(attributes.get("title"), TITLE_LIMIT),
            description=cut(attributes.get("description"), DESCRIPTION_LIMIT),
            metadata=_metadata(source, key, payload, attributes),
            assignees=usernames(source, _assignees(payload, attributes)),
            cancel_reason=_closing_reason(attributes) if kind == Kind.CLOSED else "",
            happened_at=sender_time(attributes.get("updated_at")),
        )


def _assignees(payload: Mapping[str, Any], attributes: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The issue's assignees now, or None when the payload does not say."""
    changes = payload.get("changes")
    changed = changes.get("assignees") if isinstance(changes, dict) else None
    if isinstance(changed, dict) and "current" in changed:
        return logins(changed["current"])
    if "assignees" in payload:
        return logins(payload["assignees"])
    # GitLab leaves the assignees list out when there is none.
    return () if attributes.get("assignee_ids") == [] else None


def _closing_reason(attributes: Mapping[str, Any]) -> str:
    """Empty (complete the task), unless the issue was closed by a move or as a duplicate."""
    moved_to = attributes.get("moved_to_id")
    if isinstance(moved_to, int):
        return f"issue moved to another GitLab project (issue id {moved_to})"
    duplicate_of = attributes.get("duplicated_to_id")
    if isinstance(duplicate_of, int):
        return f"issue closed as a duplicate (of GitLab issue id {duplicate_of})"
    return ""


def _metadata(
    source: str, key: str, payload: Mapping[str, Any], attributes: Mapping[str, Any]
) -> dict[str, Any]:
    """The task metadata an issue sets: where it comes from, labels, milestone."""
    origin: dict[str, Any] = {"source": source, "key": key}
    url = cut(attributes.get("url"), 500)
    if url:
        origin["url"] = url
    issue_type = cut(attributes.get("type"), NAME_LIMIT)
    if issue_type:
        origin["type"] = issue_type
    metadata: dict[str, Any] = {"origin": origin}
    labels = names(payload.get("labels", attributes.get("labels")), "title")
    if labels is not None:
        metadata["labels"] = labels
    if "milestone_id" in attributes:
        # GitLab's issue events name the milestone by id only.
        milestone = attributes["milestone_id"]
        metadata["milestone"] = {"id": milestone} if isinstance(milestone, int) else None
    return metadata


SCHEME = GitLab()
