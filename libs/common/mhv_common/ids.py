"""Identifiers a caller sends: UUIDs, checked once, the same way everywhere.

Only the canonical spelling is an id: 32 hex digits in the groups 8-4-4-4-12, in either case.
Python's `uuid.UUID` would also take braces, a ``urn:uuid:`` prefix or hyphens anywhere; one
id with many spellings would make the same user look like several in logs and lookups.
"""

from __future__ import annotations

import re
import uuid

from mhv_common.errors import FieldViolation, ValidationError

UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\Z")
"""A UUID in its canonical, hyphenated form (either case)."""


def uuid_or_none(value: str) -> uuid.UUID | None:
    """The UUID `value` spells canonically, or None: for callers that raise their own error.

    A token's subject that is not a user id is an authentication failure, not a bad field;
    a validator of a typed request raises `ValueError`. Everything else uses `parse_uuid`.
    """
    return uuid.UUID(value) if UUID_PATTERN.match(value) else None


def canonical_uuid(
    value: str,
    *,
    field: str,
    description: str = "must be a UUID",
    message: str | None = None,
) -> str:
    """The UUID a request field holds, as lowercase canonical text.

    For code that stores or hashes the text (the audit log): about a tenth of the cost of
    building a `uuid.UUID` and printing it again.

    Args:
        value: The text as sent.
        field: The field's name in the request, e.g. ``assigned_to`` or ``events[3].user_id``.
        description: What the field must be, for the caller, when it is not.
        message: The error's message, when the catalog's title is not enough.

    Raises:
        ValidationError: `value` is not a canonical UUID; the violation names `field` (MHV-003).

    """
    if not UUID_PATTERN.match(value):
        raise ValidationError(message, violations=[FieldViolation(field, description)])
    return value.lower()


def parse_uuid(
    value: str,
    *,
    field: str,
    description: str = "must be a UUID",
    message: str | None = None,
) -> uuid.UUID:
    """The UUID a request field holds; arguments and errors as `canonical_uuid`."""
    return uuid.UUID(canonical_uuid(value, field=field, description=description, message=message))


__all__ = ["UUID_PATTERN", "canonical_uuid", "parse_uuid", "uuid_or_none"]
