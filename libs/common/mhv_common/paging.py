"""Opaque page tokens (AIP-158) for keyset pagination: the one codec every listing uses.

A token carries the position after the last item returned (e.g. the last id) and a digest of
the query's filters (order included). Keyset positions stay correct while rows are inserted:
nothing is skipped or repeated. A token presented with different filters, or damaged, is
refused with MHV-011 and a field violation naming ``page_token``. Tokens are not secret: all
they can move is a position within rows the caller may list anyway.

Layout: unpadded base64url of ``{"f": <16 hex digits of SHA-256 over the canonical JSON of the
filters>, "p": <the position object>}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mhv_common.errors import FieldViolation, InvalidPageTokenError, ValidationError

DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 100


def _digest(filters: Mapping[str, Any]) -> str:
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_token(position: Mapping[str, Any], *, filters: Mapping[str, Any]) -> str:
    """Make a token for the page after `position`, valid only with the same `filters`."""
    body = json.dumps({"f": _digest(filters), "p": dict(position)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


_INT64 = (-(2**63), 2**63 - 1)


def decode_token(
    token: str, *, filters: Mapping[str, Any], fields: Mapping[str, type] | None = None
) -> dict[str, Any] | None:
    """Return the position in `token` (None for an empty token, i.e. the first page).

    Args:
        token: The page token a client sent.
        filters: The request's filters; the token must have been issued for the same.
        fields: Position field -> the type it must have (int fields must fit a bigint), so
            that a forged token is refused here instead of failing in the database.

    Raises:
        InvalidPageTokenError: The token is damaged, forged, or was issued for other filters.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode()))
        digest, position = body["f"], body["p"]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise not_ours() from exc
    if not isinstance(position, dict):
        raise not_ours()
    if digest != _digest(filters):
        raise InvalidPageTokenError(
            "The page token was issued for different filters; send the same filters or "
            "start again without page_token.",
            violations=[
                FieldViolation(
                    "page_token",
                    "was issued for different filters or another order; send the same ones",
                )
            ],
        )
    for name, kind in (fields or {}).items():
        value = position.get(name)
        ok = type(value) is kind or (kind is float and type(value) is int)
        if isinstance(value, int) and kind is int:
            ok = ok and _INT64[0] <= value <= _INT64[1]
        if not ok:
            raise not_ours()
    return position


def not_ours() -> InvalidPageTokenError:
    """The error for a token this service did not issue (MHV-011, naming ``page_token``).

    For listings that check the position further after `decode_token` (a time, a UUID).
    """
    return InvalidPageTokenError(
        "The page token is not valid.",
        violations=[FieldViolation("page_token", "is not a token this service issued")],
    )


def page_size(
    requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """The page size to use: `default` for 0, at most `maximum`.

    Raises:
        ValidationError: `requested` is negative.
    """
    if requested < 0:
        raise ValidationError(violations=[FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)
