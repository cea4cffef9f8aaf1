"""GitHub (``scheme: github``): how it signs, what its deliveries say, what they change.

Authentication: ``X-Hub-Signature-256: sha256=<hex>`` = HMAC-SHA256(secret, body). Neither the
delivery id nor a timestamp is signed, so there is no freshness check; replay protection is the
delivery id (``X-GitHub-Delivery``) and the body's SHA-256, both remembered for the dedup
retention (days).

Task changes: ``issues`` events opened, edited, closed (completed, or cancelled when closed as
not planned), reopened and assigned. Every other event and action is stored and ignored.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import ConfigurationError, WebhookSignatureInvalidError
from mhv_webhook._changes import Change, IgnoredEvent, Kind, issue_change, login
from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import (
    DELIVERY_ID,
    EVENT,
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


_ACTIONS = {
    "opened": Kind.OPENED,
    "edited": Kind.EDITED,
    "closed": Kind.CLOSED,
    "reopened": Kind.REOPENED,
    "assigned": Kind.ASSIGNED,
}


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
        kind = _ACTIONS.get(str(payload.get("action")))
        if kind is None:
            return IgnoredEvent(
                f"GitHub issues action {payload.get('action')!r} does not change tasks"
            )
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
        actor = login(payload.get("sender")) or login(issue.get("user"))
        if not actor:
            return IgnoredEvent("GitHub issues event without a sender")
        return issue_change(
            kind,
            source=source,
            external_key=f"{full_name}#{number}",
            repository=configured.name,
            actor=actor,
            title=issue.get("title"),
            description=issue.get("body"),
            assignee=login(payload.get("assignee")) if kind == Kind.ASSIGNED else "",
            not_planned=issue.get("state_reason") == "not_planned",
        )


SCHEME = GitHub()
