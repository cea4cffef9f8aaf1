"""The task service's one outbound gRPC edge: the audit service, as the outbox relay sends to it.

Encoding only: which events to send, when, and what to do when a send fails is the relay's
business (`mhv_task._relay`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from google.protobuf import struct_pb2

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_common.auth import ServiceCredentials
from mhv_common.client import Peer, service_channel
from mhv_common.timestamps import to_timestamp
from mhv_task._events import PendingEvent


def to_record(event: PendingEvent) -> audit_pb2.EventRecord:
    """An outbox event as the audit service's EventRecord."""
    details = struct_pb2.Struct()
    details.update(event.details)
    return audit_pb2.EventRecord(
        event_id=str(event.event_id),
        task_id=event.task_id,
        event_type=event.event_type,
        user_id=str(event.user_id),
        details=details,
        occur_time=to_timestamp(event.occurred_at),
        request_id=event.request_id,
        traceparent=event.traceparent,
        subject_kind=event.subject_kind,
        subject_id=event.subject_id,
    )


class AuditClient:
    """AuditService.RecordEvents over one channel, as the task service."""

    def __init__(
        self, stub: audit_pb2_grpc.AuditServiceStub, credentials: ServiceCredentials
    ) -> None:
        self._stub = stub
        self._credentials = credentials

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, peer: Peer, credentials: ServiceCredentials
    ) -> AsyncIterator[AuditClient]:
        """A client on a channel to `peer`, closed on exit."""
        async with service_channel(peer) as channel:
            yield cls(audit_pb2_grpc.AuditServiceStub(channel), credentials)

    async def record(self, events: Sequence[PendingEvent], *, timeout: float | None) -> None:
        """Record `events` (the audit service ignores those it has already).

        Waits for the audit service to be reachable, within `timeout`.
        """
        await self._stub.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[to_record(e) for e in events]),
            timeout=timeout,
            metadata=self._credentials.metadata(),
            wait_for_ready=True,
        )
