"""Request headers as the gateway reads them: by lower-case name, strictly, only when asked."""

from __future__ import annotations

import re
from collections.abc import Iterable

from mhv_common.errors import FieldViolation, ValidationError

# What a stored header value may be: short printable ASCII.
_STORABLE = re.compile(r"^[\x20-\x7e]{1,200}$")


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
                if _STORABLE.match(text):
                    kept[name] = text
        return kept
