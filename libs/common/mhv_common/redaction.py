"""Redaction of audit details: applied before anything is stored or logged.

Two rules, from the plan and the audit issue:

- the plan's sensitive fields (``description``, ``metadata``) keep only their length:
  ``[REDACTED (N characters)]``, N being the length of the value's text (JSON for structures);
- any key, at any depth, whose name looks secret (token, secret, password, api_key,
  authorization, ...) is redacted the same way.

Redaction is idempotent: an already redacted value is left as it is, so details may pass through
it more than once (outbox, then audit service) without losing the original length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from mhv_common.logs import SECRET_KEY_PATTERN

SENSITIVE_FIELDS = frozenset({"description", "metadata"})
_REDACTED = re.compile(r"^\[REDACTED \(\d+ characters\)\]$")


def _mask(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if _REDACTED.match(value):
            return value
        text = value
    else:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return f"[REDACTED ({len(text)} characters)]"


def _walk(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: _mask(v) if SECRET_KEY_PATTERN.search(str(k)) else _walk(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_walk(v) for v in value]
    return value


def redact_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """Return a redacted copy of audit `details` (the input is not changed)."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        if key in SENSITIVE_FIELDS or SECRET_KEY_PATTERN.search(str(key)):
            out[key] = _mask(value)
        else:
            out[key] = _walk(value)
    return out
