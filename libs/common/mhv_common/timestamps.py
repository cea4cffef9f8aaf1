"""Times between PostgreSQL, the domain and the wire: datetimes, microseconds, protobuf Timestamps.

PostgreSQL keeps microseconds, so integer microseconds since the Unix epoch are the exact
form of a stored time (the audit chain hashes them). Datetimes are always aware, in UTC. A
``google.protobuf.Timestamp`` covers 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z;
a time a caller sends outside that range, or with nanos outside 0..999,999,999, is not a time.
"""

from __future__ import annotations

import datetime as dt
from typing import overload

from google.protobuf import timestamp_pb2

MIN_SECONDS = -62_135_596_800
"""Seconds since the epoch of 0001-01-01T00:00:00Z, the earliest Timestamp."""
MAX_SECONDS = 253_402_300_799
"""Seconds since the epoch of 9999-12-31T23:59:59Z, the latest Timestamp (whole second)."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MICROSECOND = dt.timedelta(microseconds=1)


def to_micros(moment: dt.datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    return (moment - _EPOCH) // _ONE_MICROSECOND


def from_micros(micros: int) -> dt.datetime:
    """The aware UTC datetime `micros` microseconds after the Unix epoch."""
    return _EPOCH + dt.timedelta(microseconds=micros)


def micros_of(seconds: int, nanos: int) -> int | None:
    """Microseconds since the epoch of a Timestamp's (seconds, nanos), or None when invalid.

    Nanoseconds are truncated to the microsecond, PostgreSQL's precision. Taking the two numbers
    rather than the message keeps protobuf out of the domain modules that validate times.
    """
    if not (MIN_SECONDS <= seconds <= MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return None
    return seconds * 1_000_000 + nanos // 1000


def set_micros(stamp: timestamp_pb2.Timestamp, micros: int) -> None:
    """Set `stamp` (usually a field of a message being built) to `micros` since the epoch.

    Filling a message's own field in place avoids the copy that passing a new Timestamp to the
    message's constructor makes; it matters when encoding thousands of rows.
    """
    seconds, fraction = divmod(micros, 1_000_000)
    stamp.seconds = seconds
    stamp.nanos = fraction * 1000


@overload
def to_timestamp(moment: dt.datetime) -> timestamp_pb2.Timestamp: ...
@overload
def to_timestamp(moment: None) -> None: ...
def to_timestamp(moment: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """An aware datetime as a Timestamp; None (an unset optional time) stays None."""
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    """A Timestamp as an aware UTC datetime.

    Raises:
        ValueError: The Timestamp lies outside the range a datetime can hold (or a Timestamp
            may have), or its nanos are out of range.

    """
    if micros_of(stamp.seconds, stamp.nanos) is None:
        raise ValueError("not a valid Timestamp (years 1-9999, nanos 0-999999999)")
    moment: dt.datetime = stamp.ToDatetime(dt.UTC)
    return moment


__all__ = [
    "MAX_SECONDS",
    "MIN_SECONDS",
    "from_micros",
    "from_timestamp",
    "micros_of",
    "set_micros",
    "to_micros",
    "to_timestamp",
]
