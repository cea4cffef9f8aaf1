"""Webhook secrets from ``MHV_WEBHOOK_SECRETS_<NAME>``: several at once, newest first, with expiry.

Syntax of the variable (documented in docs/security/webhook-authentication.md)::

    SECRET[;expires=YYYY-MM-DDTHH:MM:SSZ][;id=LABEL] [, SECRET[;...] ...]

Entries are separated by commas, newest first; during a rotation the old and the new secret
are both listed and both accepted, and ``expires`` retires an entry automatically at that
instant (UTC). Secrets may therefore contain neither ``,`` nor ``;``. ``id`` names the entry in
the ``webhook_secret_matches_total{key}`` metric; without it the label is the entry's position
(``0`` = newest), so a match on ``1`` after a rotation means senders still use the old secret.

A secret that starts with ``whsec_`` is a Standard Webhooks signing key (base64 after the
prefix); any other value is used as its UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass

from mhv_common.errors import ConfigurationError

SIGNING_KEY_PREFIX = "whsec_"
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
# Shorter shared secrets are guessable offline from one captured signature.
MIN_SECRET_BYTES = 16


@dataclass(frozen=True, slots=True)
class Secret:
    """One configured secret.

    Attributes:
        key: The HMAC key or token, as bytes.
        label: Metric label naming this entry (its ``id`` or its position).
        expires_at: Unix time after which the entry is refused, or None.
        signing_key: Whether the entry was given as a ``whsec_`` signing key.

    """

    key: bytes
    label: str
    expires_at: float | None
    signing_key: bool

    def active(self, now: float) -> bool:
        """Whether the entry may still be used at Unix time `now`."""
        return self.expires_at is None or now < self.expires_at

    def __repr__(self) -> str:
        # Never print the key itself, in logs or in tracebacks.
        return (
            f"Secret(label={self.label!r}, expires_at={self.expires_at}, "
            f"signing={self.signing_key})"
        )


def env_name(source: str) -> str:
    """The environment variable holding `source`'s secrets."""
    return f"MHV_WEBHOOK_SECRETS_{source.upper()}"


def _decode_signing_key(text: str, where: str) -> bytes:
    body = text[len(SIGNING_KEY_PREFIX) :]
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(
            f"{where}: a whsec_ secret must be base64 after the prefix."
        ) from exc
    if not key:
        raise ConfigurationError(f"{where}: a whsec_ secret must not be empty.")
    return key


def _parse_expiry(text: str, where: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigurationError(
            f"{where}: expires must be an ISO 8601 UTC time such as 2026-12-31T00:00:00Z."
        ) from exc
    if moment.tzinfo is None:
        raise ConfigurationError(f"{where}: expires needs a time zone (end it with Z).")
    return moment.timestamp()


def parse_secrets(source: str, text: str | None) -> tuple[Secret, ...]:
    """Parse the value of ``MHV_WEBHOOK_SECRETS_<SOURCE>``.

    Raises:
        ConfigurationError: Unset or empty (fail closed), or an entry is malformed. Messages
            name the variable and the entry's position, never the secret.

    """
    variable = env_name(source)
    if text is None or not text.strip():
        raise ConfigurationError(
            f"{variable} is not set: source {source!r} would accept unauthenticated deliveries.",
            recovery=(
                f"Set {variable} to the secret the sender signs with (comma-separated, newest "
                "first), or remove the source from settings/webhooks.yaml.",
                "See docs/security/webhook-authentication.md.",
            ),
        )
    secrets: list[Secret] = []
    labels: set[str] = set()
    for position, entry in enumerate(text.split(",")):
        where = f"{variable} entry {position}"
        value, *options = (part.strip() for part in entry.split(";"))
        if not value:
            raise ConfigurationError(f"{where}: the secret is empty.")
        expires_at: float | None = None
        label = str(position)
        for option in options:
            name, sep, arg = option.partition("=")
            if not sep or not arg:
                raise ConfigurationError(f"{where}: options are written name=value.")
            if name == "expires":
                expires_at = _parse_expiry(arg, where)
            elif name == "id":
                if not _LABEL.match(arg):
                    raise ConfigurationError(f"{where}: id must be 1-32 of A-Z a-z 0-9 _ . -")
                label = arg
            else:
                raise ConfigurationError(f"{where}: unknown option {name!r} (expires, id).")
        if label in labels:
            raise ConfigurationError(f"{where}: id {label!r} is used twice.")
        labels.add(label)
        signing = value.startswith(SIGNING_KEY_PREFIX)
        key = _decode_signing_key(value, where) if signing else value.encode("utf-8")
        if len(key) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"{where}: the secret is shorter than {MIN_SECRET_BYTES} bytes.",
                recovery=("Generate one with `openssl rand -hex 32`.",),
            )
        secrets.append(Secret(key, label, expires_at, signing))
    return tuple(secrets)
