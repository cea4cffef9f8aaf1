"""Operators' view of the inbox: page tokens, ids, and what a listing may ask for."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from mhv_common import paging
from mhv_common.errors import InvalidPageTokenError, ValidationError
from mhv_webhook._deliveries import (
    Deliveries,
    ListRequest,
    decode_page_token,
    encode_page_token,
    parse_delivery_id,
)
from mhv_webhook._store_inbox import DeliveryRow

MOMENT = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)


class _Untouched:
    """An inbox that fails the test if anything reads it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the inbox was used: {name}")


def _row() -> DeliveryRow:
    return DeliveryRow(
        id=uuid.uuid4(),
        source="github",
        delivery_id="d-1",
        event="issues",
        action="opened",
        state="pending",
        attempts=0,
        last_error="",
        received_at=MOMENT,
        updated_at=MOMENT,
        next_attempt_at=MOMENT,
        saga_step=None,
        task_id=None,
    )


def test_a_page_token_resumes_after_its_row_for_its_filters_only() -> None:
    row = _row()
    token = encode_page_token(row, source="github", state="pending")
    assert decode_page_token(token, source="github", state="pending") == (MOMENT, row.id)
    for source, state in (("gitlab", "pending"), ("github", None), ("github", "completed")):
        with pytest.raises(InvalidPageTokenError):
            decode_page_token(token, source=source, state=state)
    for garbage in ("not-a-token", "", "e30=", "ü"):
        with pytest.raises(InvalidPageTokenError):
            decode_page_token(garbage, source="github", state="pending")


@pytest.mark.parametrize(
    "position",
    [
        {"t": 10**18, "i": str(uuid.uuid4())},  # after the year 9999
        {"t": 0, "i": "not-a-uuid"},
        {"t": "2026-01-01T12:00:00+00:00", "i": str(uuid.uuid4())},
        {"i": str(uuid.uuid4())},
    ],
)
def test_a_forged_position_is_refused_as_not_ours(position: dict[str, object]) -> None:
    token = paging.encode_token(position, filters={"source": "github", "state": None})
    with pytest.raises(InvalidPageTokenError) as refused:
        decode_page_token(token, source="github", state=None)
    assert [v.field for v in refused.value.violations] == ["page_token"]


def test_delivery_ids_are_the_gateways_uuids() -> None:
    known = uuid.uuid4()
    assert parse_delivery_id(str(known)) == known
    with pytest.raises(ValidationError) as refused:
        parse_delivery_id("42; DROP TABLE")
    assert [v.field for v in refused.value.violations] == ["id"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ListRequest(page_size=-1), "page_size"),
        (ListRequest(source="x" * 65), "source"),
    ],
)
async def test_a_listing_out_of_bounds_is_refused_before_the_inbox_is_read(
    request_: ListRequest, field: str
) -> None:
    deliveries = Deliveries(_Untouched())  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as refused:
        await deliveries.list(request_)
    assert [v.field for v in refused.value.violations] == [field]
