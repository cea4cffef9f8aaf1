"""Who may call each AuditService RPC: every role, and no token at all."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_audit.app import POLICIES, SERVICE
from mhv_common.auth import Role
from tests.audit.support import as_role, event, list_all, random_task_id, rpc_error, stub
from tests.conftest import Services
from tests.harness import Keys, bearer, grpc_channel

ALLOWED = {
    "RecordEvents": {Role.SERVICE},  # and an administrator, for credential events only (below)
    "ListAuditEvents": {Role.ADMIN, Role.AUDITOR},
    "VerifyAuditChain": {Role.ADMIN, Role.AUDITOR},
}


@pytest.fixture
async def client(services: Services) -> AsyncIterator[audit_pb2_grpc.AuditServiceStub]:
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        yield stub(channel)


def test_every_rpc_has_a_policy_matching_this_table() -> None:
    gates = {name.rsplit("/", 1)[1]: set(p.roles) for name, p in POLICIES.items()}
    assert gates == {**ALLOWED, "RecordEvents": {Role.SERVICE, Role.ADMIN}}
    assert all(name.startswith(f"/{SERVICE}/") for name in POLICIES)


def _request(method: str, task_id: int) -> object:
    if method == "RecordEvents":
        return audit_pb2.RecordEventsRequest(events=[event(task_id)])
    if method == "ListAuditEvents":
        return audit_pb2.ListAuditEventsRequest(task_id=task_id)
    return audit_pb2.VerifyAuditChainRequest(end_id=1)


@pytest.mark.parametrize("method", sorted(ALLOWED))
@pytest.mark.parametrize("role", [*Role, None], ids=lambda r: str(r) if r else "no-token")
async def test_role_gate(
    client: audit_pb2_grpc.AuditServiceStub,
    keys: Keys,
    method: str,
    role: Role | None,
) -> None:
    task_id = random_task_id()
    call = getattr(client, method)
    metadata = as_role(keys, role) if role is not None else ()
    if role in ALLOWED[method]:
        await call(_request(method, task_id), metadata=metadata, timeout=30)
        if method == "RecordEvents":
            assert len(await list_all(client, keys, task_id=task_id)) == 1
        return
    error = await rpc_error(call(_request(method, task_id), metadata=metadata, timeout=30))
    if role is None:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details().startswith("[MHV-004]")
    else:
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details().startswith("[MHV-005]")
    if method == "RecordEvents":
        # A refused write wrote nothing.
        assert await list_all(client, keys, task_id=task_id) == []


async def test_other_services_may_not_write_audit_history(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    # The service role alone is not enough: only the task service's relay writes task events.
    task_id = random_task_id()
    for subject in ("service:webhook", "service:anything"):
        error = await rpc_error(
            client.RecordEvents(
                _request("RecordEvents", task_id),
                metadata=bearer(keys.token(Role.SERVICE, subject=subject)),
                timeout=30,
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await list_all(client, keys, task_id=task_id) == []


def _subject_event(kind: str, event_type: str, actor: str) -> audit_pb2.EventRecord:
    record = event(0, event_type, user_id=actor)
    record.subject_kind = kind
    record.subject_id = str(uuid.uuid4())
    return record


@pytest.mark.parametrize(
    ("writer", "kind", "event_type", "allowed"),
    [
        ("service:task", "user", "user_created", True),
        ("service:task", "delivery", "delivery_retried", False),
        ("service:task", "credential", "jwks_published", False),
        ("service:webhook", "delivery", "delivery_retried", True),
        ("service:webhook", "user", "user_deleted", False),
        ("service:webhook", "credential", "db_password_rotated", False),
        ("admin", "credential", "webhook_secret_rotated", True),
        ("admin", "user", "user_created", False),
        ("admin", "delivery", "delivery_retried", False),
        ("auditor", "credential", "webhook_secret_rotated", False),
    ],
)
async def test_each_writer_records_only_its_own_subjects(
    client: audit_pb2_grpc.AuditServiceStub,
    keys: Keys,
    writer: str,
    kind: str,
    event_type: str,
    allowed: bool,
) -> None:
    # A person writes as their own, existing user (services check people's users on every
    # call); what a service records is about users it names.
    actor = keys.people.get(writer) or str(uuid.uuid4())
    if writer.startswith("service:"):
        metadata = bearer(keys.token(Role.SERVICE, subject=writer))
    else:
        metadata = bearer(keys.token(Role(writer), subject=actor))
    record = _subject_event(kind, event_type, actor)
    request = audit_pb2.RecordEventsRequest(events=[record])
    if allowed:
        await client.RecordEvents(request, metadata=metadata, timeout=30)
    else:
        error = await rpc_error(client.RecordEvents(request, metadata=metadata, timeout=30))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    found = await list_all(client, keys, subject_kind=kind, subject_id=record.subject_id)
    assert [(e.event_type, e.user_id) for e in found] == ([(event_type, actor)] if allowed else [])


async def test_an_administrator_records_only_their_own_actions(
    client: audit_pb2_grpc.AuditServiceStub, keys: Keys
) -> None:
    someone_else = str(uuid.uuid4())
    record = _subject_event("credential", "signing_key_generated", someone_else)
    error = await rpc_error(
        client.RecordEvents(
            audit_pb2.RecordEventsRequest(events=[record]),
            metadata=bearer(keys.token(Role.ADMIN)),
            timeout=30,
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await list_all(client, keys, subject_id=record.subject_id) == []
