"""Times between PostgreSQL, the domain and the wire (mhv_common.timestamps)."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import timestamp_pb2

from mhv_common.timestamps import (
    MAX_SECONDS,
    MIN_SECONDS,
    from_micros,
    from_timestamp,
    micros_of,
    set_micros,
    to_micros,
    to_timestamp,
)


def test_micros_round_trip() -> None:
    moment = dt.datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    assert from_micros(to_micros(moment)) == moment
    assert to_micros(dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)) == -1


def test_the_range_bounds_are_year_1_and_year_9999() -> None:
    assert from_micros(MIN_SECONDS * 1_000_000) == dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    assert from_micros(MAX_SECONDS * 1_000_000) == dt.datetime(
        9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    ("seconds", "nanos", "micros"),
    [
        (0, 0, 0),
        (1, 999_999_999, 1_999_999),  # truncated to PostgreSQL's microsecond
        (-1, 1_000, -999_999),
        (MIN_SECONDS, 0, MIN_SECONDS * 1_000_000),
        (MAX_SECONDS, 999_999_999, MAX_SECONDS * 1_000_000 + 999_999),
        (MIN_SECONDS - 1, 0, None),
        (MAX_SECONDS + 1, 0, None),
        (0, -1, None),
        (0, 1_000_000_000, None),
    ],
)
def test_micros_of_a_timestamp_or_none_when_it_is_not_one(
    seconds: int, nanos: int, micros: int | None
) -> None:
    assert micros_of(seconds, nanos) == micros


@pytest.mark.parametrize("micros", [0, 1, -1, 1_735_787_045_123_456, MIN_SECONDS * 1_000_000])
def test_set_micros_and_back(micros: int) -> None:
    stamp = timestamp_pb2.Timestamp()
    set_micros(stamp, micros)
    assert 0 <= stamp.nanos < 1_000_000_000
    assert micros_of(stamp.seconds, stamp.nanos) == micros
    assert to_micros(from_timestamp(stamp)) == micros


def test_datetimes_to_timestamps_and_back() -> None:
    moment = dt.datetime(2030, 1, 31, 17, 0, 0, 250_000, tzinfo=dt.UTC)
    stamp = to_timestamp(moment)
    assert (stamp.seconds, stamp.nanos) == (1_896_109_200, 250_000_000)
    assert from_timestamp(stamp) == moment
    assert to_timestamp(None) is None


@pytest.mark.parametrize(("seconds", "nanos"), [(MAX_SECONDS + 1, 0), (0, -5)])
def test_from_timestamp_refuses_what_is_not_a_time(seconds: int, nanos: int) -> None:
    with pytest.raises(ValueError, match="not a valid Timestamp"):
        from_timestamp(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
