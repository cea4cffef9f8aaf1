r"""The hash chain: the canonical encoding of an audit row, its hash, and the scan over a run.

Canonical encoding, version 1 (docs/security/audit-logging.md gives the same definition with a
worked example). The bytes hashed for a row are the UTF-8 encoding of one JSON object written
per RFC 8785 (JSON Canonicalization Scheme, JCS): no whitespace, members sorted by the UTF-16
code units of their names, strings with only ``"``, ``\`` and U+0000..U+001F escaped (as
``\b \t \n \f \r`` or lowercase ``\u00xx``), numbers as ECMAScript writes IEEE doubles. Its
members, in that (sorted) order:

    created_at   decimal string: microseconds since 1970-01-01T00:00:00Z (database clock)
    details      the redacted details object, canonicalised the same way (stored verbatim in
                 ``details_canonical``, so verification hashes it without parsing it)
    event_id     lowercase hyphenated UUID
    event_type   string
    id           decimal string: position in the chain, 1, 2, 3, ...
    occur_time   decimal string: microseconds since the epoch
    prev_hash    64 lowercase hex digits: the previous row's hash; all zeros for row 1
    request_id   string (may be empty)
    subject_id   string: what a non-task event is about (a user's or delivery's UUID, a
                 credential's name)                                    } only in rows whose
    subject_kind string: user, delivery or credential                  } subject is not a task
    task_id      decimal string (0 when the subject is not a task)
    trace_id     32 lowercase hex digits, or empty
    user_id      lowercase hyphenated UUID

A task row (``subject_kind`` "task", ``subject_id`` empty) has no subject members: its encoding
is exactly the one rows had before subjects existed, so their hashes still verify. Any other
row has both, so every stored column is covered by the hash, whichever kind it is.
``hash = SHA-256(encoding)``. Integers are strings because JCS numbers are doubles and ids are
64-bit. Every value comes from a stored column, so the verifier recomputes the hash from the
row alone; the link is in the content (``prev_hash``), so a row cannot be moved or relinked
without its hash changing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

import orjson

GENESIS_HASH = bytes(32)
"""The ``prev_hash`` of row 1."""

ENCODING_VERSION = 1

# Doubles represent every integer below this exactly; JCS writes them as plain digits.
_MAX_EXACT_INTEGER = 2**53
_RECORD = (
    '{"created_at":"%d","details":%s,"event_id":%s,"event_type":%s,"id":"%d",'
    '"occur_time":"%d","prev_hash":"%s","request_id":%s,%s"task_id":"%d","trace_id":%s,'
    '"user_id":%s}'
)
TASK_SUBJECT = "task"
"""The subject kind of task events, the only kind whose encoding leaves the subject out."""


def _subject_members(subject_kind: str, subject_id: str) -> str:
    if subject_kind == TASK_SUBJECT and not subject_id:
        return ""
    return (
        f'"subject_id":{encode_basestring(subject_id)},'
        f'"subject_kind":{encode_basestring(subject_kind)},'
    )


# --- JSON canonicalisation (RFC 8785) ------------------------------------------------------


class _NeedsSlowPath(Exception):
    """A number whose JCS form differs from Python's; the exact (slower) encoder handles it."""


def _fast_int(text: str) -> int:
    value = int(text)
    if -_MAX_EXACT_INTEGER < value < _MAX_EXACT_INTEGER:
        return value
    raise _NeedsSlowPath


def _fast_float(text: str) -> int | float:
    value = float(text)
    if value.is_integer():
        if -_MAX_EXACT_INTEGER < value < _MAX_EXACT_INTEGER:
            return int(value)
        raise _NeedsSlowPath
    # Below 2**53 a non-integral double's repr is the ECMAScript form as long as Python does
    # not switch to exponent notation, which it does under 1e-4 (ECMAScript: under 1e-6).
    if math.isfinite(value) and abs(value) >= 1e-4:
        return value
    raise _NeedsSlowPath


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_FAST_DECODER = json.JSONDecoder(
    parse_float=_fast_float, parse_int=_fast_int, parse_constant=_reject_constant
)
# Python and orjson sort keys by code point, JCS by UTF-16 code unit: they differ only around
# characters outside the Basic Multilingual Plane, written as themselves or escaped as a
# surrogate pair. Such texts, and any surrogate (raw or escaped, which must then be refused),
# take the exact pure-Python path.
_ASTRAL = re.compile("[\U00010000-\U0010ffff\ud800-\udfff]|\\\\u[dD][89a-fA-F]")
# A JSON number starts the text or follows '[', ':' or ',' (spaces allowed). No match means no
# number, and then orjson alone is exact (its escaping and key order are JCS's); a match inside
# a string only costs the slower path.
_MAYBE_NUMBER = re.compile(r"(?:^|[\[:,])\s*[-0-9]")
_SORT_KEYS = orjson.OPT_SORT_KEYS


def jcs_number(value: float) -> str:
    """Write a double as ECMAScript's Number.prototype.toString does (RFC 8785 section 3.2.2.3).

    Raises:
        ValueError: NaN or an infinity (JSON has neither).

    """
    if not math.isfinite(value):
        raise ValueError("JSON numbers must be finite")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)
    significant = digits.lstrip("0")
    point -= len(digits) - len(significant)
    digits = significant.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        e = n - 1
        head = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{head}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + text


def _jcs(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return encode_basestring(value)
    if isinstance(value, int | float):
        try:
            return jcs_number(float(value))
        except OverflowError as exc:
            raise ValueError("JSON number out of the range of a double") from exc
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(f"{encode_basestring(k)}:{_jcs(v)}" for k, v in items) + "}"
    raise ValueError(f"not a JSON value: {type(value).__name__}")


def canonical_json(text: str) -> str:
    """The RFC 8785 canonical form of a JSON text.

    Three paths, all exact: no numbers and no characters beyond the BMP (the usual details) go
    through orjson alone; numbers that Python and ECMAScript write alike are normalised while
    parsing, then written by orjson; anything else takes the pure-Python encoder.

    Raises:
        ValueError: `text` is not JSON, or holds a number no double can represent.

    """
    if _ASTRAL.search(text) is not None:
        canonical = _jcs(json.loads(text, parse_constant=_reject_constant))
        try:
            # json.loads accepts an escaped lone surrogate; RFC 8785 (and UTF-8) do not.
            canonical.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("JSON text holds a lone UTF-16 surrogate") from None
        return canonical
    if _MAYBE_NUMBER.search(text) is None:
        return orjson.dumps(orjson.loads(text), option=_SORT_KEYS).decode()
    try:
        return orjson.dumps(_FAST_DECODER.decode(text), option=_SORT_KEYS).decode()
    except _NeedsSlowPath:
        return _jcs(json.loads(text, parse_constant=_reject_constant))


# --- Rows and their hashes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A validated, redacted event ready to be chained.

    Attributes:
        event_id: Lowercase UUID; the idempotency key.
        task_id: The task the event is about.
        event_type: One of `mhv_audit.EVENT_TYPES`.
        user_id: Lowercase UUID of the actor.
        details: Canonical JSON text of the redacted details object.
        occur_us: When the change was committed, microseconds since the epoch.
        request_id: Request id of the change (may be empty).
        trace_id: W3C trace id (32 hex digits) of the change, or empty.
        subject_kind: What the event is about: task, user, delivery or credential.
        subject_id: Its id unless a task (`task_id` names a task; it is 0 otherwise).

    """

    event_id: str
    task_id: int
    event_type: str
    user_id: str
    details: str
    occur_us: int
    request_id: str
    trace_id: str
    subject_kind: str = TASK_SUBJECT
    subject_id: str = ""


@dataclass(frozen=True, slots=True)
class ChainedEvent:
    """An event with its place in the chain: what one row of the log holds."""

    id: int
    created_us: int
    prev_hash: bytes
    hash: bytes
    event: NewEvent


def _encode(
    created_us: int,
    details: str,
    event_id: str,
    event_type: str,
    row_id: int,
    occur_us: int,
    prev_hash: bytes,
    request_id: str,
    task_id: int,
    trace_id: str,
    user_id: str,
    subject_kind: str,
    subject_id: str,
) -> bytes:
    # Positional, in the encoding's member order: the scan calls this once per row.
    return (
        _RECORD
        % (
            created_us,
            details,
            encode_basestring(event_id),
            encode_basestring(event_type),
            row_id,
            occur_us,
            prev_hash.hex(),
            encode_basestring(request_id),
            _subject_members(subject_kind, subject_id),
            task_id,
            encode_basestring(trace_id),
            encode_basestring(user_id),
        )
    ).encode()


def encode_record(
    *,
    row_id: int,
    created_us: int,
    details: str,
    event_id: str,
    event_type: str,
    occur_us: int,
    prev_hash: bytes,
    request_id: str,
    task_id: int,
    trace_id: str,
    user_id: str,
    subject_kind: str = TASK_SUBJECT,
    subject_id: str = "",
) -> bytes:
    """The canonical encoding of one row (see the module docstring).

    `details` must already be canonical JSON text (`canonical_json`).
    """
    return _encode(
        created_us,
        details,
        event_id,
        event_type,
        row_id,
        occur_us,
        prev_hash,
        request_id,
        task_id,
        trace_id,
        user_id,
        subject_kind,
        subject_id,
    )


def link(
    events: Sequence[NewEvent], *, head_id: int, head_hash: bytes, created_us: int
) -> list[ChainedEvent]:
    """Chain `events`, in order, after the row `head_id` whose hash is `head_hash`."""
    chained: list[ChainedEvent] = []
    prev = head_hash
    for offset, event in enumerate(events, start=1):
        row_id = head_id + offset
        digest = hashlib.sha256(
            encode_record(
                row_id=row_id,
                created_us=created_us,
                details=event.details,
                event_id=event.event_id,
                event_type=event.event_type,
                occur_us=event.occur_us,
                prev_hash=prev,
                request_id=event.request_id,
                task_id=event.task_id,
                trace_id=event.trace_id,
                user_id=event.user_id,
                subject_kind=event.subject_kind,
                subject_id=event.subject_id,
            )
        ).digest()
        chained.append(ChainedEvent(row_id, created_us, prev, digest, event))
        prev = digest
    return chained


@dataclass(frozen=True, slots=True)
class StoredRow:
    """One row as read back from the log, with every column the hash covers.

    The store returns rows with the columns in exactly this order, so the scan can unpack
    them positionally without building objects. `details` is the stored canonical text;
    `details_match` says whether the queryable jsonb column still equals it (verification
    reads only).
    """

    id: int
    event_id: str
    task_id: int
    event_type: str
    user_id: str
    details: str
    occur_us: int
    created_us: int
    request_id: str
    trace_id: str
    prev_hash: bytes
    hash: bytes
    subject_kind: str = TASK_SUBJECT
    subject_id: str = ""
    details_match: bool = True

    @classmethod
    def of(cls, values: Iterable[Any]) -> StoredRow:
        """Build from a row in the store's column order."""
        return cls(*values)


def row_hash(row: StoredRow, *, as_id: int | None = None) -> bytes:
    """Recompute a stored row's hash, optionally as if it had id `as_id`."""
    return hashlib.sha256(
        encode_record(
            row_id=row.id if as_id is None else as_id,
            created_us=row.created_us,
            details=row.details,
            event_id=row.event_id,
            event_type=row.event_type,
            occur_us=row.occur_us,
            prev_hash=row.prev_hash,
            request_id=row.request_id,
            task_id=row.task_id,
            trace_id=row.trace_id,
            user_id=row.user_id,
            subject_kind=row.subject_kind,
            subject_id=row.subject_id,
        )
    ).digest()


class ChainScanner:
    """Checks consecutive rows, chunk by chunk, and stops at the first one out of place.

    A row is in place when its id is the next expected id, it is not beyond the chain head, its
    ``prev_hash`` is the previous row's hash, its hash matches its content and its queryable
    jsonb details equal the hashed text. The scan only finds the first row out of place;
    `mhv_audit._verify` then works out what happened there. Rows come in the store's
    verification column order (`StoredRow` plus ``details_match``).

    Args:
        expected_id: Id of the first row to come.
        expected_prev: Hash the first row must link to; None to take its link as given (a
            range starting after a row that is absent).
        head_id: Last id of the chain per its head, when the range reaches it; rows past it
            were not appended through the head.

    """

    def __init__(self, *, expected_id: int, expected_prev: bytes | None, head_id: int | None):
        self.expected_id = expected_id
        self.expected_prev = expected_prev
        self.head_id = head_id
        self.rows_checked = 0
        self.last: Sequence[Any] | None = None

    def feed(self, rows: Sequence[Sequence[Any]]) -> int | None:
        """Check `rows` (store column order); return the index of the first bad one, or None."""
        expected_id = self.expected_id
        expected_prev = self.expected_prev
        limit = self.head_id if self.head_id is not None else math.inf
        sha256 = hashlib.sha256
        checked = 0
        bad: int | None = None
        for index, row in enumerate(rows):
            (
                row_id,
                event_id,
                task_id,
                event_type,
                user_id,
                details,
                occur_us,
                created_us,
                request_id,
                trace_id,
                prev_hash,
                digest,
                subject_kind,
                subject_id,
                details_match,
            ) = row
            if row_id != expected_id or row_id > limit or not details_match:
                bad = index
                break
            if expected_prev is not None and prev_hash != expected_prev:
                bad = index
                break
            encoded = _encode(
                created_us,
                details,
                event_id,
                event_type,
                row_id,
                occur_us,
                prev_hash,
                request_id,
                task_id,
                trace_id,
                user_id,
                subject_kind,
                subject_id,
            )
            if sha256(encoded).digest() != digest:
                bad = index
                break
            expected_id = row_id + 1
            expected_prev = digest
            checked += 1
        self.rows_checked += checked
        if checked:
            self.last = rows[checked - 1]
        self.expected_id = expected_id
        self.expected_prev = expected_prev
        return bad
