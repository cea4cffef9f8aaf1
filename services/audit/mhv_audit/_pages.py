"""Opaque page tokens for ListAuditEvents.

A token is a cursor, not an offset: the id of the last row of the page, so the next page is
``id < cursor`` (newest first) or ``id > cursor`` (oldest first). Rows appended meanwhile
never shift a page: newest-first listings do not repeat or skip anything, oldest-first ones
simply reach the new rows at their end. The token also carries a digest of the filters and the
order it was issued for; sent with other filters it is refused (MHV-011) instead of silently
paging through a different result.

Layout (base64url, unpadded): version byte 1, 16 bytes of SHA-256 over the filters, the
cursor id as 8 bytes big-endian. Tokens are not secret: all they can move is a cursor within
rows the caller may list anyway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from mhv_audit._store import ListFilter
from mhv_common.errors import FieldViolation, InvalidPageTokenError

_VERSION = 1
_DIGEST_BYTES = 16
_LENGTH = 1 + _DIGEST_BYTES + 8


def _digest(where: ListFilter) -> bytes:
    key = json.dumps(
        [
            _VERSION,
            where.task_id,
            where.user_id,
            where.event_type,
            where.start_us,
            where.end_us,
            where.newest_first,
        ],
        separators=(",", ":"),
    )
    return hashlib.sha256(key.encode()).digest()[:_DIGEST_BYTES]


def encode_page_token(where: ListFilter, last_id: int) -> str:
    """The token for the page after the row `last_id` of the listing `where`."""
    raw = bytes([_VERSION]) + _digest(where) + last_id.to_bytes(8, "big", signed=True)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_page_token(token: str, where: ListFilter) -> int:
    """The cursor id in `token`, checked against the listing `where`.

    Raises:
        InvalidPageTokenError: Not a token of this service, or issued for other filters or
            another order (MHV-011).

    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _LENGTH or raw[0] != _VERSION:
        raise InvalidPageTokenError(
            "The page token is malformed.",
            violations=[FieldViolation("page_token", "is not a token this service issued")],
        )
    if raw[1 : 1 + _DIGEST_BYTES] != _digest(where):
        raise InvalidPageTokenError(
            violations=[
                FieldViolation(
                    "page_token",
                    "was issued for different filters or another order; send the same ones",
                )
            ]
        )
    cursor = int.from_bytes(raw[1 + _DIGEST_BYTES :], "big", signed=True)
    if cursor < 0:
        raise InvalidPageTokenError(
            violations=[FieldViolation("page_token", "is not a token this service issued")]
        )
    return cursor
