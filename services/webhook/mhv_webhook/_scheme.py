"""What every sender scheme provides, and the checks the schemes share.

A scheme is everything the gateway knows about one kind of sender, in one module: how its
requests are authenticated (a `Verifier` per declared source, built from the source's secrets),
what its deliveries are called (`Scheme.describe`, stored for operators) and which task change
a stored delivery asks for (`Scheme.interpret`). The modules are `mhv_webhook._scheme_github`,
`_scheme_gitlab` and `_scheme_standard`; `mhv_webhook._schemes` lists them.

Verification works on the exact raw bytes: nothing parses the body before the signature is
verified, and every comparison of a secret-derived value is constant-time
(`hmac.compare_digest`). Verifiers are pure: the current time is passed in, so freshness
windows are tested at their edges.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mhv_common.config import RepositoryCatalog
from mhv_common.errors import FieldViolation, ValidationError
from mhv_webhook._changes import Change
from mhv_webhook._headers import HeaderView
from mhv_webhook._secrets import Secret

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Sender ids and event names are short printable ASCII everywhere we know of.
DELIVERY_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
EVENT = re.compile(r"^[\x20-\x7e]{1,200}$")
# A form body from GitHub has one field; a few more are tolerated, thousands are not parsed.
_MAX_FORM_FIELDS = 16


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


class Verifier(Protocol):
    """One source's check of its requests, with the source's secrets."""

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

    def key_labels(self) -> tuple[str, ...]:
        """Every label `verify` may report in `Verified.matched_keys` (for the key metric)."""


class Scheme(Protocol):
    """Everything the gateway knows about one kind of sender.

    Attributes:
        name: The scheme's name in settings/webhooks.yaml (``scheme: github``).
        kept_headers: Non-secret headers stored with each delivery.
        body_formats: The media types its senders send bodies in (JSON first).
    """

    name: str
    kept_headers: tuple[str, ...]
    body_formats: tuple[BodyFormat, ...]

    def verifier(
        self, secrets: Sequence[Secret], *, window: FreshnessWindow, variable: str
    ) -> Verifier:
        """The verifier of one declared source of this scheme.

        Args:
            secrets: The source's secrets, newest first.
            window: Accepted distance of signed timestamps from the gateway's clock.
            variable: The environment variable the secrets came from, for messages.

        Raises:
            ConfigurationError: The secrets are of a kind this scheme cannot use.
        """

    def describe(self, verified: Verified, payload: Mapping[str, Any]) -> tuple[str, str]:
        """(event, action) of a verified delivery, from its headers and parsed body."""

    def check(
        self, *, event: str, payload: Mapping[str, Any], repositories: RepositoryCatalog
    ) -> None:
        """Refuse, before the delivery is stored, a payload the sender must correct.

        Raises:
            ValidationError: The payload breaks the scheme's published schema (MHV-003,
                with a field violation per problem).
        """

    def interpret(
        self,
        *,
        source: str,
        event: str,
        payload: Mapping[str, Any],
        repositories: RepositoryCatalog,
    ) -> Change:
        """The task change a stored delivery of source `source` asks for."""


def required_header(headers: HeaderView, name: str, pattern: re.Pattern[str], what: str) -> str:
    """A header the scheme cannot do without, matching `pattern`.

    Raises:
        ValidationError: Missing, or not a `what` (MHV-003, naming the header).
    """
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


def checked_delivery_id(value: str, header: str) -> str:
    """A signed message id, checked to be usable as a delivery id.

    Raises:
        ValidationError: Not 1-200 printable characters (MHV-003, naming the header).
    """
    if not DELIVERY_ID.match(value):
        raise ValidationError(
            f"The {header} header is not a valid delivery id.",
            violations=[FieldViolation(header, "1-200 printable characters")],
        )
    return value


def active_secrets(secrets: Sequence[Secret], now: float) -> list[Secret]:
    """The secrets not expired at `now` (an error is logged when none is left)."""
    active = [s for s in secrets if s.active(now)]
    if not active:
        logger.error("every secret of a webhook source has expired")
    return active


def printable(value: Any) -> str:
    """A payload field as stored text: printable and short, else empty."""
    return value if isinstance(value, str) and EVENT.match(value) else ""


def body_digest(body: bytes) -> tuple[str, str]:
    """The dedup key that recognises the same body under another delivery id."""
    return ("body_sha256", hashlib.sha256(body).hexdigest())


class BodyFormat(enum.StrEnum):
    """How a sender encodes its payload, by the media type of its ``Content-Type``."""

    JSON = "application/json"
    # GitHub, for a hook configured so: ``payload=<the JSON, percent-encoded>``.
    FORM = "application/x-www-form-urlencoded"


def body_format(headers: HeaderView, accepted: Sequence[BodyFormat]) -> BodyFormat:
    """The format the request's ``Content-Type`` names (JSON when it names none).

    Raises:
        ValidationError: A media type the scheme's senders do not send (MHV-003).
    """
    value = headers.get("content-type")
    media = (value or "").partition(";")[0].strip().lower()
    if not media:
        return BodyFormat.JSON
    for candidate in accepted:
        if media == candidate.value:
            return candidate
    names = " or ".join(f.value for f in accepted)
    raise ValidationError(
        f"Content-Type {media!r} is not accepted here; send {names}.",
        violations=[FieldViolation("content-type", f"must be {names}")],
    )


def decode_payload(body: bytes, fmt: BodyFormat) -> dict[str, Any]:
    """Decode a verified body as a JSON object, from the format it was sent in.

    Raises:
        ValidationError: Not UTF-8, not JSON, nested too deeply, or not an object; a form
            without exactly one ``payload`` field.

    """
    text: str | bytes = body
    if fmt is BodyFormat.FORM:
        text = _form_payload(body)
    try:
        payload = json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValidationError(
            "The payload is not a UTF-8 JSON document.",
            violations=[FieldViolation("body", "must be a JSON object in UTF-8")],
        ) from None
    if not isinstance(payload, dict):
        raise ValidationError(
            "The payload must be a JSON object.",
            violations=[FieldViolation("body", "must be a JSON object")],
        )
    return payload


def _form_payload(body: bytes) -> str:
    """The ``payload`` field of a form body (other fields, if any, are not ours to read)."""
    try:
        fields = urllib.parse.parse_qs(
            body.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        fields = {}
    found = fields.get("payload", [])
    if len(found) != 1:
        raise ValidationError(
            "A form-encoded body must carry the JSON in exactly one `payload` field.",
            violations=[FieldViolation("body", "must be payload=<JSON>, form-encoded")],
        )
    return found[0]
