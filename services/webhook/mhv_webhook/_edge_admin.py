"""The gRPC edge of WebhookAdminService: decode, call the domain, encode (admin only).

Authentication, the admin role gate, deadlines, rate limits and error mapping are the common
interceptors' job (`mhv_common.interceptors`, policies in `mhv_webhook.app`); the decisions are
`mhv_webhook._deliveries`'. This module only translates between protobuf and the domain.
"""

from __future__ import annotations

from typing import Any

from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.errors import FieldViolation, ValidationError
from mhv_common.timestamps import to_timestamp
from mhv_webhook._deliveries import Deliveries, ListRequest
from mhv_webhook._store_inbox import STATES, DeliveryRow

_STATE_TO_PB = {
    name: webhook_pb2.DeliveryState.Value(f"DELIVERY_STATE_{name.upper()}") for name in STATES
}
_PB_TO_STATE = {value: name for name, value in _STATE_TO_PB.items()}


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
        receive_time=to_timestamp(row.received_at),
        update_time=to_timestamp(row.updated_at),
        next_attempt_time=to_timestamp(row.next_attempt_at),
    )


def _state(value: int) -> str | None:
    if value == webhook_pb2.DELIVERY_STATE_UNSPECIFIED:
        return None
    if value not in _PB_TO_STATE:
        raise ValidationError(violations=[FieldViolation("state", "is not a delivery state")])
    return _PB_TO_STATE[value]


class WebhookAdminServicer(webhook_pb2_grpc.WebhookAdminServiceServicer):
    """WebhookAdminService over the domain's `Deliveries`."""

    def __init__(self, deliveries: Deliveries) -> None:
        self._deliveries = deliveries

    async def ListDeliveries(
        self, request: webhook_pb2.ListDeliveriesRequest, _ctx: Any
    ) -> webhook_pb2.ListDeliveriesResponse:
        """Deliveries newest first, filtered by source and state, in pages."""
        page = await self._deliveries.list(
            ListRequest(
                source=request.source,
                state=_state(request.state),
                page_size=request.page_size,
                page_token=request.page_token,
            )
        )
        return webhook_pb2.ListDeliveriesResponse(
            deliveries=[to_proto(r) for r in page.deliveries],
            next_page_token=page.next_page_token,
        )

    async def GetDelivery(
        self, request: webhook_pb2.GetDeliveryRequest, _ctx: Any
    ) -> webhook_pb2.Delivery:
        """One delivery with its saga progress."""
        return to_proto(await self._deliveries.get(request.id))

    async def RetryDelivery(
        self, request: webhook_pb2.RetryDeliveryRequest, _ctx: Any
    ) -> webhook_pb2.Delivery:
        """Re-queue a dead-lettered delivery (same row, same dedup key)."""
        return to_proto(await self._deliveries.retry(request.id))
