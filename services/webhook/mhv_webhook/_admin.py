"""WebhookAdminService: operators list, inspect and retry deliveries (admin only)."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from typing import Any

from google.protobuf import timestamp_pb2

from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common import context
from mhv_common.errors import (
    DeliveryNotFoundError,
    DeliveryNotRetryableError,
    FieldViolation,
    InvalidPageTokenError,
    ValidationError,
)
from mhv_webhook._inbox import STATES, DeliveryRow, Inbox

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_STATE_TO_PB = {
    name: webhook_pb2.DeliveryState.Value(f"DELIVERY_STATE_{name.upper()}") for name in STATES
}
_PB_TO_STATE = {value: name for name, value in _STATE_TO_PB.items()}


def _timestamp(moment: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def to_proto(row: DeliveryRow) -> webhook_pb2.Delivery:
    """Encode an inbox row."""
    return webhook_pb2.Delivery(
        id=str(row.id),
        source=row.source,
        delivery_id=row.delivery_id,
        event=row.event,
        action=row.action,
        state=_STATE_TO_PB[row.state],
        attempts=row.attempts,
        last_error=row.last_error,
        saga_step=row.saga_step or "",
        task_id=row.task_id or 0,
        receive_time=_timestamp(row.received_at),
        update_time=_timestamp(row.updated_at),
        next_attempt_time=_timestamp(row.next_attempt_at),
    )


def _parse_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValidationError(
            "The delivery id is not a UUID.",
            violations=[FieldViolation("id", "must be the gateway's delivery id (a UUID)")],
        ) from None


def _filters(source: str, state: str | None) -> str:
    return f"{source}\x00{state or ''}"


def encode_page_token(row: DeliveryRow, *, source: str, state: str | None) -> str:
    """Opaque keyset token: the last row's position and the filters it belongs to."""
    data = {"t": row.received_at.isoformat(), "i": str(row.id), "f": _filters(source, state)}
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def decode_page_token(
    token: str, *, source: str, state: str | None
) -> tuple[dt.datetime, uuid.UUID]:
    """Position after which the next page starts.

    Raises:
        InvalidPageTokenError: Not a token of ours, or issued for other filters (MHV-011).

    """
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        position = (dt.datetime.fromisoformat(data["t"]), uuid.UUID(data["i"]))
        issued_for = data["f"]
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError):
        raise InvalidPageTokenError() from None
    if issued_for != _filters(source, state) or position[0].tzinfo is None:
        raise InvalidPageTokenError()
    return position


def _deadline() -> float | None:
    return context.time_left(None)


class WebhookAdminServicer(webhook_pb2_grpc.WebhookAdminServiceServicer):
    """The gRPC edge over the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    async def ListDeliveries(
        self, request: webhook_pb2.ListDeliveriesRequest, _ctx: Any
    ) -> webhook_pb2.ListDeliveriesResponse:
        """Deliveries newest first, filtered by source and state, in pages."""
        if request.page_size < 0:
            raise ValidationError(violations=[FieldViolation("page_size", "must not be negative")])
        if len(request.source) > 64:
            raise ValidationError(violations=[FieldViolation("source", "is too long")])
        if request.state not in _PB_TO_STATE and request.state != 0:
            raise ValidationError(violations=[FieldViolation("state", "is not a delivery state")])
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        state = _PB_TO_STATE.get(request.state)
        after = (
            decode_page_token(request.page_token, source=request.source, state=state)
            if request.page_token
            else None
        )
        rows = await self._inbox.list_deliveries(
            source=request.source or None,
            state=state,
            after=after,
            limit=size + 1,
            timeout=_deadline(),
        )
        page, more = rows[:size], len(rows) > size
        return webhook_pb2.ListDeliveriesResponse(
            deliveries=[to_proto(r) for r in page],
            next_page_token=encode_page_token(page[-1], source=request.source, state=state)
            if more
            else "",
        )

    async def GetDelivery(
        self, request: webhook_pb2.GetDeliveryRequest, _ctx: Any
    ) -> webhook_pb2.Delivery:
        """One delivery with its saga progress."""
        row = await self._inbox.get_delivery(_parse_id(request.id), timeout=_deadline())
        if row is None:
            raise DeliveryNotFoundError()
        return to_proto(row)

    async def RetryDelivery(
        self, request: webhook_pb2.RetryDeliveryRequest, _ctx: Any
    ) -> webhook_pb2.Delivery:
        """Re-queue a dead-lettered delivery (same row, same dedup key)."""
        delivery = _parse_id(request.id)
        if not await self._inbox.requeue_dead_letter(delivery, timeout=_deadline()):
            row = await self._inbox.get_delivery(delivery, timeout=_deadline())
            if row is None:
                raise DeliveryNotFoundError()
            raise DeliveryNotRetryableError(
                f"The delivery is {row.state}; only dead-lettered deliveries can be retried."
            )
        row = await self._inbox.get_delivery(delivery, timeout=_deadline())
        assert row is not None
        return to_proto(row)
