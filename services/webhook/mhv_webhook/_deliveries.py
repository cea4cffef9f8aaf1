"""Operators' view of the inbox: list, inspect and retry deliveries.

The domain behind WebhookAdminService (`mhv_webhook._edge_admin`): it checks what operators
ask for, pages through the inbox with opaque keyset tokens and decides whether a delivery can
be retried.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mhv_common import context, outbox, paging
from mhv_common.errors import (
    DeliveryNotFoundError,
    DeliveryNotRetryableError,
    FieldViolation,
    ValidationError,
)
from mhv_common.ids import parse_uuid, uuid_or_none
from mhv_common.timestamps import from_micros, to_micros
from mhv_webhook._store_inbox import DeliveryRow, Inbox

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Source names are at most 32 characters (settings/webhooks.yaml); longer is not a filter.
MAX_SOURCE_FILTER = 64


@dataclass(frozen=True, slots=True)
class ListRequest:
    """What an operator lists.

    Attributes:
        source: Only this source's deliveries; empty for every source.
        state: Only deliveries in this state (`mhv_webhook._store_inbox.STATES`), or None.
        page_size: Deliveries per page; 0 for the default, at most `MAX_PAGE_SIZE`.
        page_token: Where the previous page ended, or empty for the first page.
    """

    source: str = ""
    state: str | None = None
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryPage:
    """One page of deliveries, newest first, and the token of the next ("" after the last)."""

    deliveries: tuple[DeliveryRow, ...]
    next_page_token: str


def _filters(source: str, state: str | None) -> dict[str, str | None]:
    return {"source": source, "state": state}


def encode_page_token(row: DeliveryRow, *, source: str, state: str | None) -> str:
    """Opaque keyset token (`mhv_common.paging`): the last row's position, for these filters."""
    position = {"t": to_micros(row.received_at), "i": str(row.id)}
    return paging.encode_token(position, filters=_filters(source, state))


def decode_page_token(
    token: str, *, source: str, state: str | None
) -> tuple[dt.datetime, uuid.UUID]:
    """Position after which the next page starts.

    Raises:
        InvalidPageTokenError: Not a token of ours, or issued for other filters (MHV-011).

    """
    position = paging.decode_token(
        token, filters=_filters(source, state), fields={"t": int, "i": str}
    )
    delivery = uuid_or_none(position["i"]) if position else None
    if position is None or delivery is None:
        raise paging.not_ours()
    try:
        received = from_micros(position["t"])
    except OverflowError:  # a forged time beyond the year 9999
        raise paging.not_ours() from None
    return received, delivery


def parse_delivery_id(text: str) -> uuid.UUID:
    """The gateway's id of a delivery.

    Raises:
        ValidationError: Not a UUID (MHV-003).
    """
    return parse_uuid(
        text,
        field="id",
        description="must be the gateway's delivery id (a UUID)",
        message="The delivery id is not a UUID.",
    )


class Deliveries:
    """Listing, inspection and retry of deliveries, over the inbox store.

    Each call's statements are bounded by the current request's deadline.
    """

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    async def list(self, request: ListRequest) -> DeliveryPage:
        """Deliveries newest first, filtered by source and state, in pages.

        Raises:
            ValidationError: Negative page size or an overlong source (MHV-003).
            InvalidPageTokenError: The token is not ours or belongs to other filters (MHV-011).
        """
        size = paging.page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        if len(request.source) > MAX_SOURCE_FILTER:
            raise ValidationError(violations=[FieldViolation("source", "is too long")])
        after = (
            decode_page_token(request.page_token, source=request.source, state=request.state)
            if request.page_token
            else None
        )
        rows = await self._inbox.list_deliveries(
            source=request.source or None,
            state=request.state,
            after=after,
            limit=size + 1,
            timeout=context.time_left(),
        )
        page, more = rows[:size], len(rows) > size
        return DeliveryPage(
            tuple(page),
            encode_page_token(page[-1], source=request.source, state=request.state) if more else "",
        )

    async def get(self, delivery_id: str) -> DeliveryRow:
        """One delivery with its saga progress.

        Raises:
            ValidationError: The id is not a UUID (MHV-003).
            DeliveryNotFoundError: No such delivery (MHV-307).
        """
        row = await self._inbox.get_delivery(
            parse_delivery_id(delivery_id), timeout=context.time_left()
        )
        if row is None:
            raise DeliveryNotFoundError()
        return row

    async def retry(self, delivery_id: str) -> DeliveryRow:
        """Re-queue a dead-lettered delivery (same row, same dedup key); return it, pending.

        The change and its audit event (``delivery_retried``, attributed to the calling
        operator) commit together, through the gateway's outbox.

        Raises:
            ValidationError: The id is not a UUID (MHV-003).
            DeliveryNotFoundError: No such delivery (MHV-307).
            DeliveryNotRetryableError: The delivery is not dead-lettered (MHV-308).
        """
        delivery = parse_delivery_id(delivery_id)
        actor = outbox.caller_user_id()

        def retried(before: Mapping[str, Any]) -> outbox.SubjectEvent:
            return outbox.subject_event(
                "delivery_retried",
                actor=actor,
                subject_kind="delivery",
                subject_id=str(delivery),
                details={
                    "source": before["source"],
                    "sender_delivery_id": before["delivery_id"],
                    "event": before["event"],
                    "state": {"old": "dead_letter", "new": "pending"},
                    # Not its last error: free text that may quote what a sender or the task
                    # service said; the delivery itself keeps it for operators.
                    "attempts_before": before["attempts"],
                },
            )

        if not await self._inbox.requeue_dead_letter(
            delivery, audit=retried, timeout=context.time_left()
        ):
            row = await self._inbox.get_delivery(delivery, timeout=context.time_left())
            if row is None:
                raise DeliveryNotFoundError()
            raise DeliveryNotRetryableError(
                f"The delivery is {row.state}; only dead-lettered deliveries can be retried."
            )
        row = await self._inbox.get_delivery(delivery, timeout=context.time_left())
        assert row is not None
        return row
