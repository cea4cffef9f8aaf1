"""Signature, token and freshness checks for each sender's scheme, on the exact raw bytes.

Nothing here parses the body before the signature is verified, and every comparison of a
secret-derived value is constant-time (`hmac.compare_digest`). The verifiers are pure: the
current time comes from an injected clock, so the freshness window is tested at its edges.

Schemes:

- ``github``: ``X-Hub-Signature-256: sha256=<hex>`` = HMAC-SHA256(secret, body). Neither the
  delivery id nor a timestamp is signed, so there is no freshness check; replay protection is
  the delivery id and the body's SHA-256, both remembered for the dedup retention (days).
- ``gitlab``: ``X-Gitlab-Token`` (a shared secret sent as is) and/or GitLab's signing token,
  which follows Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``).
  Plain secrets check the token, ``whsec_`` secrets the signature; with both kinds configured
  both must pass.
- ``standard``: Standard Webhooks v1, HMAC-SHA256 over ``{id}.{timestamp}.{body}``, signatures
  ``v1,<base64>`` separated by spaces, freshness bounded in the past and the future.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mhv_common.errors import (
    FieldViolation,
    ValidationError,
    WebhookSignatureInvalidError,
    WebhookTimestampInvalidError,
)
from mhv_webhook._secrets import Secret

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Sender ids and event names are short printable ASCII everywhere we know of.
_DELIVERY_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_EVENT = re.compile(r"^[\x20-\x7e]{1,200}$")
_UNIX_SECONDS = re.compile(r"^[0-9]{1,12}$")
# More signatures than this in one header is not a rotation, it is an attempt to burn CPU.
MAX_SIGNATURES = 16


@dataclass(frozen=True, slots=True)
class FreshnessWindow:
    """How far a signed timestamp may lie from the gateway's clock, each side separately.

    Attributes:
        past_seconds: Oldest accepted age (default 300 s).
        future_seconds: Furthest accepted lead, for senders whose clock runs ahead (default 30 s).

    """

    past_seconds: float = 300.0
    future_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified request tells about the delivery.

    Attributes:
        delivery_id: The sender's id for this delivery (shown to operators, deduplicated).
        event: Event name from a header, or empty when the scheme carries it in the body.
        matched_keys: Labels of the secrets that matched, for the key-usage metric.
        dedup_keys: (kind, key) pairs remembered to recognise repeats of this delivery.

    """

    delivery_id: str
    event: str
    matched_keys: tuple[str, ...]
    dedup_keys: tuple[tuple[str, str], ...]


class HeaderView:
    """Request headers by lower-case name, decoded strictly and only when asked for.

    ASGI hands over raw bytes; a header we rely on that is repeated, is not UTF-8 or carries
    control characters makes the request malformed (MHV-003) instead of being guessed at.
    """

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._values: dict[bytes, list[bytes]] = {}
        for name, value in raw:
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str) -> str | None:
        """The single value of header `name`, or None when absent.

        Raises:
            ValidationError: Repeated, not UTF-8, or containing control characters.

        """
        values = self._values.get(name.lower().encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise ValidationError(
                f"The {name} header is repeated.",
                violations=[FieldViolation(name, "must appear once")],
            )
        try:
            text = values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError(
                f"The {name} header is not valid UTF-8.",
                violations=[FieldViolation(name, "must be UTF-8 text")],
            ) from None
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise ValidationError(
                f"The {name} header contains control characters.",
                violations=[FieldViolation(name, "must not contain control characters")],
            )
        return text.strip()

    def pick(self, names: Iterable[str]) -> dict[str, str]:
        """Printable values of the listed headers that are present once, for storage."""
        kept: dict[str, str] = {}
        for name in names:
            values = self._values.get(name.encode("ascii"))
            if values and len(values) == 1:
                try:
                    text = values[0].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if _EVENT.match(text):
                    kept[name] = text
        return kept


def _required(headers: HeaderView, name: str, pattern: re.Pattern[str], what: str) -> str:
    value = headers.get(name)
    if not value:
        raise ValidationError(
            f"The {name} header is missing.", violations=[FieldViolation(name, "is required")]
        )
    if not pattern.match(value):
        raise ValidationError(
            f"The {name} header is not a valid {what}.",
            violations=[FieldViolation(name, f"must be a {what} of 1-200 printable characters")],
        )
    return value


def _active(secrets: Sequence[Secret], now: float) -> list[Secret]:
    active = [s for s in secrets if s.active(now)]
    if not active:
        logger.error("every secret of a webhook source has expired")
    return active


def check_freshness(timestamp: str | None, *, now: float, window: FreshnessWindow) -> int:
    """Parse a signed Unix timestamp and check it lies within the window around `now`.

    Raises:
        WebhookTimestampInvalidError: Missing, not whole seconds, too old or too far ahead.

    """
    if timestamp is None:
        raise WebhookTimestampInvalidError("The webhook-timestamp header is missing.")
    if not _UNIX_SECONDS.match(timestamp):
        raise WebhookTimestampInvalidError(
            "The webhook-timestamp header is not a Unix time in whole seconds."
        )
    value = int(timestamp)
    if now - value > window.past_seconds:
        raise WebhookTimestampInvalidError(
            f"The delivery is older than the {window.past_seconds:g} s accepted."
        )
    if value - now > window.future_seconds:
        raise WebhookTimestampInvalidError(
            f"The delivery is dated more than {window.future_seconds:g} s in the future."
        )
    return value


def _standard_signatures(header: str) -> list[bytes]:
    entries = header.split()
    if len(entries) > MAX_SIGNATURES:
        raise WebhookSignatureInvalidError(
            f"The webhook-signature header lists more than {MAX_SIGNATURES} signatures."
        )
    found: list[bytes] = []
    for entry in entries:
        version, sep, encoded = entry.partition(",")
        if not sep or version != "v1":
            continue  # other versions are for other verifiers
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def precheck_standard(
    headers: HeaderView, *, now: float, window: FreshnessWindow
) -> tuple[str, str, str]:
    """The Standard Webhooks checks that need no body: (signature, timestamp, webhook-id).

    Raises:
        WebhookTimestampInvalidError: Timestamp missing, malformed or outside the window.
        WebhookSignatureInvalidError: Id or signature missing.

    """
    signature = headers.get("webhook-signature")
    if not signature:
        raise WebhookSignatureInvalidError("The webhook-signature header is missing.")
    # Stale or future-dated requests are refused before any HMAC is computed.
    timestamp = headers.get("webhook-timestamp")
    check_freshness(timestamp, now=now, window=window)
    assert timestamp is not None
    msg_id = headers.get("webhook-id")
    if not msg_id:
        raise WebhookSignatureInvalidError("The webhook-id header is missing.")
    return signature, timestamp, msg_id


def verify_standard(
    headers: HeaderView,
    body: bytes,
    secrets: Sequence[Secret],
    *,
    now: float,
    window: FreshnessWindow,
) -> tuple[str, str]:
    """Verify Standard Webhooks v1 headers; return (webhook-id, label of the matched secret).

    Raises:
        WebhookTimestampInvalidError: Timestamp missing, malformed or outside the window.
        WebhookSignatureInvalidError: Id or signature missing, or no signature matches.

    """
    signature, timestamp, msg_id = precheck_standard(headers, now=now, window=window)
    given = _standard_signatures(signature)
    signed = b".".join((msg_id.encode("utf-8"), timestamp.encode("ascii"), body))
    for secret in _active(secrets, now):
        expected = hmac.new(secret.key, signed, hashlib.sha256).digest()
        # Check every candidate, so timing does not depend on which position matched.
        matched = False
        for candidate in given:
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return msg_id, secret.label
    raise WebhookSignatureInvalidError()


class Verifier(Protocol):
    """A sender scheme's check of one request."""

    scheme: str
    kept_headers: tuple[str, ...]

    def verify(self, headers: HeaderView, body: bytes, *, now: float) -> Verified:
        """Authenticate the raw request and extract its delivery id.

        Raises:
            WebhookSignatureInvalidError: Authentication failed (MHV-300).
            WebhookTimestampInvalidError: Freshness failed (MHV-304).
            ValidationError: Required headers missing or malformed (MHV-003).

        """

    def precheck(self, headers: HeaderView, *, now: float) -> None:
        """Everything `verify` checks that needs no body, so junk is refused unread.

        Raises:
            WebhookSignatureInvalidError: Authentication failed (MHV-300).
            WebhookTimestampInvalidError: Freshness failed (MHV-304).

        """

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """(event, action) of a verified delivery, from its headers and parsed body."""

    def key_labels(self) -> tuple[str, ...]:
        """Every label `verify` may report in `Verified.matched_keys` (for the key metric)."""


def _text(value: Any) -> str:
    """A payload field as stored text: printable and short, else empty."""
    return value if isinstance(value, str) and _EVENT.match(value) else ""


def _body_digest(body: bytes) -> tuple[str, str]:
    return ("body_sha256", hashlib.sha256(body).hexdigest())


class GitHubVerifier:
    """GitHub: HMAC-SHA256 of the body in ``X-Hub-Signature-256``."""

    scheme: str = "github"
    kept_headers: tuple[str, ...] = (
        "content-type",
        "user-agent",
        "x-github-hook-id",
        "x-github-hook-installation-target-id",
        "x-github-hook-installation-target-type",
    )

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
        for secret in _active(self._secrets, now):
            if hmac.compare_digest(hmac.new(secret.key, body, hashlib.sha256).digest(), given):
                label = secret.label
                break
        if label is None:
            raise WebhookSignatureInvalidError()
        delivery = _required(headers, "x-github-delivery", _DELIVERY_ID, "delivery id")
        event = _required(headers, "x-github-event", _EVENT, "event name")
        return Verified(delivery, event, (label,), (("delivery_id", delivery), _body_digest(body)))

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """Event from ``X-GitHub-Event``, action from the body's ``action``."""
        return verified.event, _text(payload.get("action"))


class GitLabVerifier:
    """GitLab: secret token and/or signing token (Standard Webhooks form)."""

    scheme: str = "gitlab"
    kept_headers: tuple[str, ...] = (
        "content-type",
        "user-agent",
        "x-gitlab-instance",
        "x-gitlab-webhook-uuid",
        "x-gitlab-event-uuid",
        "idempotency-key",
    )

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
            precheck_standard(headers, now=now, window=self._window)

    def _token_label(self, headers: HeaderView, now: float) -> str | None:
        if not self._tokens:
            return None
        token = headers.get("x-gitlab-token")
        if not token:
            raise WebhookSignatureInvalidError("The X-Gitlab-Token header is missing.")
        # Compare digests so the comparison takes the same time whatever the lengths.
        given = hashlib.sha256(token.encode("utf-8")).digest()
        for secret in _active(self._tokens, now):
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
            msg_id, label = verify_standard(
                headers, body, self._signing, now=now, window=self._window
            )
            labels.append(f"signing:{label}")
            if idempotency_key is not None and idempotency_key != msg_id:
                raise ValidationError(
                    "The Idempotency-Key and webhook-id headers differ.",
                    violations=[FieldViolation("idempotency-key", "must equal webhook-id")],
                )
            delivery = msg_id
            if not _DELIVERY_ID.match(delivery):
                raise ValidationError(
                    "The webhook-id header is not a valid delivery id.",
                    violations=[FieldViolation("webhook-id", "1-200 printable characters")],
                )
            dedup = (("delivery_id", delivery),)
        else:
            name = "idempotency-key" if idempotency_key is not None else "x-gitlab-event-uuid"
            delivery = _required(headers, name, _DELIVERY_ID, "delivery id")
            # The token does not sign the body: remember the body too, so a captured request
            # resent under another id is still recognised.
            dedup = (("delivery_id", delivery), _body_digest(body))
        event = headers.get("x-gitlab-event") or ""
        if event and not _EVENT.match(event):
            raise ValidationError(
                "The X-Gitlab-Event header is not a valid event name.",
                violations=[FieldViolation("x-gitlab-event", "1-200 printable characters")],
            )
        return Verified(delivery, event, tuple(labels), dedup)

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """Event from ``X-Gitlab-Event`` (else ``object_kind``), action from the attributes."""
        attributes = payload.get("object_attributes")
        action = _text(attributes.get("action")) if isinstance(attributes, dict) else ""
        return verified.event or _text(payload.get("object_kind")), action


class StandardVerifier:
    """Standard Webhooks v1."""

    scheme: str = "standard"
    kept_headers: tuple[str, ...] = ("content-type", "user-agent")

    def __init__(self, secrets: Sequence[Secret], *, window: FreshnessWindow) -> None:
        self._secrets = tuple(secrets)
        self._window = window

    def key_labels(self) -> tuple[str, ...]:
        """One label per configured secret."""
        return tuple(s.label for s in self._secrets)

    def precheck(self, headers: HeaderView, *, now: float) -> None:
        """Signature, id and a fresh timestamp are there."""
        precheck_standard(headers, now=now, window=self._window)

    def verify(self, headers: HeaderView, body: bytes, *, now: float) -> Verified:
        """Check timestamp and signature over ``{id}.{timestamp}.{body}``."""
        msg_id, label = verify_standard(headers, body, self._secrets, now=now, window=self._window)
        if not _DELIVERY_ID.match(msg_id):
            raise ValidationError(
                "The webhook-id header is not a valid delivery id.",
                violations=[FieldViolation("webhook-id", "1-200 printable characters")],
            )
        # id and timestamp are signed: a replay under a fresh id fails the signature, so the
        # id alone is the dedup key.
        return Verified(msg_id, "", (label,), (("delivery_id", msg_id),))

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """Event from the payload's ``type``; Standard Webhooks has no separate action."""
        return _text(payload.get("type")), ""


def parse_payload(body: bytes) -> dict[str, Any]:
    """Parse a verified body as a JSON object.

    Raises:
        ValidationError: Not UTF-8, not JSON, nested too deeply, or not an object.

    """
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValidationError(
            "The body is not a UTF-8 JSON document.",
            violations=[FieldViolation("body", "must be a JSON object in UTF-8")],
        ) from None
    if not isinstance(payload, dict):
        raise ValidationError(
            "The body must be a JSON object.",
            violations=[FieldViolation("body", "must be a JSON object")],
        )
    return payload
