"""Shared pieces of the audit service tests: events, calls, errors, a private audit log."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from tests.harness import Cluster, Deployment, Keys, ServiceProcess, bearer, service_env
from tests.harness import metric as metric
from tests.harness import rich_status as rich_status
from tests.harness import rpc_error as rpc_error

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def random_task_id() -> int:
    """A task id no other test uses (tests share one audit log)."""
    return secrets.randbelow(2**62) + 1_000_000


def event(
    task_id: int,
    event_type: str = "task_updated",
    *,
    event_id: str | None = None,
    user_id: str | None = None,
    details: dict[str, Any] | None = None,
    occur_time: dt.datetime | None = None,
    request_id: str = "req-1",
    traceparent: str = TRACEPARENT,
) -> audit_pb2.EventRecord:
    """An EventRecord as the outbox relay sends it."""
    struct = struct_pb2.Struct()
    struct.update(details if details is not None else {"title": "Fix the flaky test"})
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(occur_time or dt.datetime.now(dt.UTC))
    return audit_pb2.EventRecord(
        event_id=event_id or str(uuid.uuid4()),
        task_id=task_id,
        event_type=event_type,
        user_id=user_id or str(uuid.uuid4()),
        details=struct,
        occur_time=stamp,
        request_id=request_id,
        traceparent=traceparent,
    )


def events(task_id: int, count: int) -> list[audit_pb2.EventRecord]:
    """`count` events of one task, each with its sequence number in its details."""
    return [event(task_id, details={"seq": n, "title": f"step {n}"}) for n in range(count)]


def stub(channel: aio.Channel) -> audit_pb2_grpc.AuditServiceStub:
    """An AuditService client on `channel`."""
    return audit_pb2_grpc.AuditServiceStub(channel)  # type: ignore[no-untyped-call]


def as_role(keys: Keys, role: Role) -> tuple[tuple[str, str], ...]:
    """Call metadata for a caller with `role` (a service caller is the task service)."""
    if role == Role.SERVICE:
        return bearer(keys.token(role, subject="service:task"))
    return bearer(keys.token(role))


async def record(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, batch: Sequence[audit_pb2.EventRecord]
) -> audit_pb2.RecordEventsResponse:
    """RecordEvents as the relay calls it (service token)."""
    reply: audit_pb2.RecordEventsResponse = await client.RecordEvents(
        audit_pb2.RecordEventsRequest(events=list(batch)),
        metadata=as_role(keys, Role.SERVICE),
        timeout=30,
    )
    return reply


async def list_all(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, **filters: Any
) -> list[audit_pb2.AuditEvent]:
    """Every page of a listing, as an auditor."""
    found: list[audit_pb2.AuditEvent] = []
    token = ""
    while True:
        reply = await client.ListAuditEvents(
            audit_pb2.ListAuditEventsRequest(page_token=token, **filters),
            metadata=as_role(keys, Role.AUDITOR),
            timeout=10,
        )
        found.extend(reply.events)
        if not reply.next_page_token:
            return found
        token = reply.next_page_token


async def verify(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys, **bounds: int
) -> audit_pb2.VerifyAuditChainResponse:
    """VerifyAuditChain as an auditor."""
    reply: audit_pb2.VerifyAuditChainResponse = await client.VerifyAuditChain(
        audit_pb2.VerifyAuditChainRequest(**bounds),
        metadata=as_role(keys, Role.AUDITOR),
        timeout=120,
    )
    return reply


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of every BadRequest field violation of `error`."""
    for detail in rich_status(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [(v.field, v.description) for v in bad.field_violations]
    return []


@dataclass
class PrivateAudit:
    """An audit service with a database of its own, for tests that tamper with the log.

    Tampering is done as a superuser with triggers switched off for the session
    (``session_replication_role = replica``), exactly what an attacker with superuser rights
    can do; the session deployment's log stays untouched.
    """

    deployment: Deployment
    process: ServiceProcess
    admin: asyncpg.Connection

    @property
    def target(self) -> str:
        """host:port of the service."""
        return self.process.target

    async def reset(self) -> None:
        """Empty the log and rewind its head (as a superuser: no role may do this)."""
        await self.admin.execute("SET session_replication_role = replica")
        try:
            await self.admin.execute("TRUNCATE audit.task_audit_log")
            await self.admin.execute(
                "UPDATE audit.chain_head SET last_id = 0, last_hash = $1", bytes(32)
            )
        finally:
            await self.admin.execute("RESET session_replication_role")

    async def tamper(self, *statements: str | tuple[str, Sequence[Any]]) -> None:
        """Run statements as a superuser with every trigger off, in one transaction."""
        async with self.admin.transaction():
            await self.admin.execute("SET LOCAL session_replication_role = replica")
            for statement in statements:
                if isinstance(statement, tuple):
                    await self.admin.execute(statement[0], *statement[1])
                else:
                    await self.admin.execute(statement)


@asynccontextmanager
async def private_audit(
    cluster: Cluster,
    keys: Keys,
    logs: Path,
    *,
    task_users: dict[str, str],
    verify_interval: float = 0,
) -> AsyncIterator[PrivateAudit]:
    """Start an audit service process on a database of its own; drop both afterwards.

    Its scheduled chain verification is off unless `verify_interval` is given, so that tests
    counting verifications count only their own. People's tokens are checked against the
    task service `task_users` names (`tests.harness.task_users_env`).
    """
    deployment = await Deployment.create(cluster)
    grpc_port, metrics_port = free_port(), free_port()
    env = service_env(
        deployment,
        keys,
        {
            "MHV_AUDIT_GRPC_PORT": str(grpc_port),
            "MHV_AUDIT_METRICS_PORT": str(metrics_port),
            "MHV_AUDIT_VERIFY_INTERVAL_SECONDS": str(verify_interval),
            **task_users,
        },
    )
    process = ServiceProcess("mhv_audit", env, grpc_port, metrics_port, logs / "audit.log")
    admin: asyncpg.Connection | None = None
    try:
        await process.start()
        admin = await asyncpg.connect(deployment.admin_url)
        yield PrivateAudit(deployment, process, admin)
    finally:
        if admin is not None:
            await admin.close()
        try:
            await asyncio.to_thread(process.stop)
        finally:
            await deployment.drop()


async def audited(
    client: audit_pb2_grpc.AuditServiceStub,
    keys: Keys,
    db: asyncpg.Connection,
    *,
    outbox: str,
    deadline: float = 60.0,
    **filters: Any,
) -> list[audit_pb2.AuditEvent]:
    """The audit events matching `filters`, once the sender's outbox has delivered everything.

    The relay marks an event delivered only after the audit service stored it, so once
    `outbox` (``task.outbox``, ``webhook.outbox``) holds nothing undelivered, every event
    committed before this call is in the log, and the listing is final: a caller can assert
    "exactly once". Waits on that condition, never on time.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    query = f"SELECT count(*) FROM {outbox} WHERE delivered_at IS NULL"
    while pending := await db.fetchval(query):
        assert loop.time() < give_up, f"{pending} events still undelivered in {outbox}"
        await asyncio.sleep(0.1)
    return await list_all(client, keys, **filters)
