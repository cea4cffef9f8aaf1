"""Standard Webhooks v1 (``scheme: standard``): signed id, timestamp and body.

The signature is HMAC-SHA256 with the ``whsec_`` key over ``{webhook-id}.{webhook-timestamp}.
{body}``, sent as ``v1,<base64>`` entries separated by spaces in ``webhook-signature`` (several
during a key rotation). The timestamp is held to a freshness window in the past and the future.
Svix sends the same three headers as ``svix-id``, ``svix-timestamp`` and ``svix-signature``;
they are read as Svix's libraries read them (the ``svix-*`` set when complete, else
``webhook-*``). GitLab's signing token follows the same rules (`mhv_webhook._scheme_gitlab`
uses `verify_signature`, ``webhook-*`` only).

Task changes: the task events of `mhv_webhook._task_events`, checked against their schema on
arrival; deliveries of other types are stored and ignored, with the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import (
    ConfigurationError,
    WebhookSignatureInvalidError,
    WebhookTimestampInvalidError,
)
from mhv_webhook import _task_events as task_events
from mhv_webhook._changes import Change
from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import (
    BodyFormat,
    FreshnessWindow,
    Verified,
    Verifier,
    active_secrets,
    checked_delivery_id,
    printable,
)
from mhv_webhook._secrets import Secret

_UNIX_SECONDS = re.compile(r"^[0-9]{1,12}$")
# More signatures than this in one header is not a rotation, it is an attempt to burn CPU.
MAX_SIGNATURES = 16


def check_freshness(
    timestamp: str | None,
    *,
    now: float,
    window: FreshnessWindow,
    header: str = "webhook-timestamp",
) -> int:
    """Parse a signed Unix timestamp and check it lies within the window around `now`.

    Raises:
        WebhookTimestampInvalidError: Missing, not whole seconds, too old or too far ahead.

    """
    if timestamp is None:
        raise WebhookTimestampInvalidError(f"The {header} header is missing.")
    if not _UNIX_SECONDS.match(timestamp):
        raise WebhookTimestampInvalidError(
            f"The {header} header is not a Unix time in whole seconds."
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


def _signatures(header: str) -> list[bytes]:
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


# The header names of Standard Webhooks, and the same three under Svix's own prefix.
STANDARD_PREFIX = "webhook"
SVIX_PREFIX = "svix"


def header_prefix(headers: HeaderView, prefixes: Sequence[str]) -> str:
    """Which header family a request uses, as Svix's libraries decide.

    The first of `prefixes` whose id, timestamp and signature are all present; else the first
    with any of the three (so errors name what the sender sent); else the last (the standard).
    """
    names = ("id", "timestamp", "signature")
    for prefix in prefixes:
        if all(headers.get(f"{prefix}-{n}") for n in names):
            return prefix
    for prefix in prefixes:
        if any(headers.get(f"{prefix}-{n}") for n in names):
            return prefix
    return prefixes[-1]


def precheck_signature(
    headers: HeaderView,
    *,
    now: float,
    window: FreshnessWindow,
    prefixes: Sequence[str] = (STANDARD_PREFIX,),
) -> tuple[str, str, str]:
    """The checks that need no body: (signature, timestamp, message id).

    Args:
        headers: The request's headers.
        now: Unix time now.
        window: Accepted distance of the signed timestamp from `now`.
        prefixes: Header families accepted, preferred first (``svix``, ``webhook``).

    Raises:
        WebhookTimestampInvalidError: Timestamp missing, malformed or outside the window.
        WebhookSignatureInvalidError: Id or signature missing.

    """
    prefix = header_prefix(headers, prefixes)
    signature = headers.get(f"{prefix}-signature")
    if not signature:
        raise WebhookSignatureInvalidError(f"The {prefix}-signature header is missing.")
    # Stale or future-dated requests are refused before any HMAC is computed.
    timestamp = headers.get(f"{prefix}-timestamp")
    check_freshness(timestamp, now=now, window=window, header=f"{prefix}-timestamp")
    assert timestamp is not None
    msg_id = headers.get(f"{prefix}-id")
    if not msg_id:
        raise WebhookSignatureInvalidError(f"The {prefix}-id header is missing.")
    return signature, timestamp, msg_id


def verify_signature(
    headers: HeaderView,
    body: bytes,
    secrets: Sequence[Secret],
    *,
    now: float,
    window: FreshnessWindow,
    prefixes: Sequence[str] = (STANDARD_PREFIX,),
) -> tuple[str, str]:
    """Verify Standard Webhooks v1 headers; return (message id, label of the matched secret).

    Raises:
        WebhookTimestampInvalidError: Timestamp missing, malformed or outside the window.
        WebhookSignatureInvalidError: Id or signature missing, or no signature matches.

    """
    signature, timestamp, msg_id = precheck_signature(
        headers, now=now, window=window, prefixes=prefixes
    )
    given = _signatures(signature)
    signed = b".".join((msg_id.encode("utf-8"), timestamp.encode("ascii"), body))
    for secret in active_secrets(secrets, now):
        expected = hmac.new(secret.key, signed, hashlib.sha256).digest()
        # Check every candidate, so timing does not depend on which position matched.
        matched = False
        for candidate in given:
            matched |= hmac.compare_digest(expected, candidate)
        if matched:
            return msg_id, secret.label
    raise WebhookSignatureInvalidError()


# Svix's own header names first, as Svix's libraries read them; then the standard ones.
_PREFIXES = (SVIX_PREFIX, STANDARD_PREFIX)


class StandardVerifier:
    """Standard Webhooks v1 with one source's signing keys."""

    def __init__(self, secrets: Sequence[Secret], *, window: FreshnessWindow) -> None:
        self._secrets = tuple(secrets)
        self._window = window

    def key_labels(self) -> tuple[str, ...]:
        """One label per configured secret."""
        return tuple(s.label for s in self._secrets)

    def precheck(self, headers: HeaderView, *, now: float) -> None:
        """Signature, id and a fresh timestamp are there."""
        precheck_signature(headers, now=now, window=self._window, prefixes=_PREFIXES)

    def verify(self, headers: HeaderView, body: bytes, *, now: float) -> Verified:
        """Check timestamp and signature over ``{id}.{timestamp}.{body}``."""
        msg_id, label = verify_signature(
            headers, body, self._secrets, now=now, window=self._window, prefixes=_PREFIXES
        )
        checked_delivery_id(msg_id, f"{header_prefix(headers, _PREFIXES)}-id")
        # id and timestamp are signed: a replay under a fresh id fails the signature, so the
        # id alone is the dedup key.
        return Verified(msg_id, "", (label,), (("delivery_id", msg_id),))


class StandardWebhooks:
    """The ``standard`` scheme."""

    name = "standard"
    kept_headers: tuple[str, ...] = ("content-type", "user-agent")
    body_formats: tuple[BodyFormat, ...] = (BodyFormat.JSON,)

    def verifier(
        self, secrets: Sequence[Secret], *, window: FreshnessWindow, variable: str
    ) -> Verifier:
        """Signing keys only: Standard Webhooks secrets are ``whsec_<base64>``."""
        if any(not s.signing_key for s in secrets):
            raise ConfigurationError(
                f"{variable}: Standard Webhooks secrets are whsec_<base64> signing keys."
            )
        return StandardVerifier(secrets, window=window)

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """Event from the payload's ``type``; Standard Webhooks has no separate action."""
        return printable(payload.get("type")), ""

    def check(
        self, *, event: str, payload: Mapping[str, Any], repositories: RepositoryCatalog
    ) -> None:
        """A task event must match its schema (other types are not task events)."""
        task_events.check(payload, repositories)

    def interpret(
        self,
        *,
        source: str,
        event: str,
        payload: Mapping[str, Any],
        repositories: RepositoryCatalog,
    ) -> Change:
        """A task event's change; any other type is stored and ignored."""
        return task_events.interpret(source=source, payload=payload, repositories=repositories)


SCHEME = StandardWebhooks()
