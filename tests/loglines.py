"""Reading the services' JSON log lines as records, not as text.

The services write one JSON object per line; how it is spaced is the encoder's business, so
tests compare fields of the parsed records. Lines that are not JSON objects (a C library's
message, an interpreter's warning) are skipped.
"""

from __future__ import annotations

import json
from typing import Any


def log_records(text: str | bytes) -> list[dict[str, Any]]:
    """Every JSON object line of `text`, in order."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def has_record(text: str | bytes, **fields: Any) -> bool:
    """Whether some record of `text` has every one of `fields` with that value."""
    return any(matches(record, **fields) for record in log_records(text))


def matches(record: dict[str, Any], **fields: Any) -> bool:
    """Whether `record` has every one of `fields` with that value."""
    return all(name in record and record[name] == value for name, value in fields.items())
