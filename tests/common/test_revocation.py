"""Revocation on every service: a deactivated or deleted user's valid token stops working.

The suite's three services run as processes; the user is deactivated or deleted through the
task service's UserService, as an administrator would. Each service must then refuse the
token within `REVOCATION_SECONDS` (the cache of an active answer). The tests wait on the
condition, with a deadline well beyond that, rather than sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mahavishnu.webhook.v1 import webhook_pb2, webhook_pb2_grpc
from mhv_common.auth import Role
from mhv_common.revocation import REVOCATION_SECONDS
from tests.audit.support import private_audit
from tests.conftest import Services
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    bearer,
    grpc_channel,
    make_person,
    mhv_code,
    rpc_error,
    task_users_env,
)

# Generous: the services share two cores with the rest of the suite.
DEADLINE_SECONDS = REVOCATION_SECONDS + 60

Call = Callable[[tuple[tuple[str, str], ...]], Awaitable[object]]


@pytest.fixture
async def channels(services: Services) -> AsyncIterator[dict[str, aio.Channel]]:
    opened = {
        name: grpc_channel(process.target, services.ca_file)
        for name, process in (
            ("task", services.task),
            ("audit", services.audit),
            ("webhook", services.webhook),
        )
    }
    yield opened
    for channel in opened.values():
        await channel.close()


def _calls(channels: dict[str, aio.Channel]) -> dict[str, tuple[Role, Call]]:
    """One read per service, with the role that may make it."""
    tasks = task_pb2_grpc.TaskServiceStub(channels["task"])
    audit = audit_pb2_grpc.AuditServiceStub(channels["audit"])
    admin = webhook_pb2_grpc.WebhookAdminServiceStub(channels["webhook"])
    return {
        "task": (
            Role.VIEWER,
            lambda md: tasks.ListTasks(task_pb2.ListTasksRequest(page_size=1), metadata=md),
        ),
        "audit": (
            Role.AUDITOR,
            lambda md: audit.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(page_size=1), metadata=md
            ),
        ),
        "webhook": (
            Role.ADMIN,
            lambda md: admin.ListDeliveries(
                webhook_pb2.ListDeliveriesRequest(page_size=1), metadata=md
            ),
        ),
    }


async def _refused_within_deadline(call: Call, md: tuple[tuple[str, str], ...]) -> aio.AioRpcError:
    """Repeat `call` until it fails; its error."""
    give_up = time.monotonic() + DEADLINE_SECONDS
    while True:
        try:
            await call(md)
        except aio.AioRpcError as error:
            return error
        assert time.monotonic() < give_up, "the token kept working"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("service", ["task", "audit", "webhook"])
@pytest.mark.parametrize("change", ["deactivate", "delete"])
async def test_a_removed_users_token_stops_working_on_every_service(
    channels: dict[str, aio.Channel],
    deployment: Deployment,
    keys: Keys,
    service: str,
    change: str,
) -> None:
    role, call = _calls(channels)[service]
    user = await make_person(deployment, f"leaver-{service}")
    md = bearer(keys.token(role, subject=user))
    await call(md)  # works while the user is active (and its answer is now cached)
    users = task_pb2_grpc.UserServiceStub(channels["task"])
    admin = bearer(keys.token(Role.ADMIN))
    if change == "deactivate":
        await users.DeactivateUser(task_pb2.DeactivateUserRequest(id=user), metadata=admin)
        expected = (grpc.StatusCode.FAILED_PRECONDITION, "MHV-112")
    else:
        await users.DeleteUser(task_pb2.DeleteUserRequest(id=user), metadata=admin)
        expected = (grpc.StatusCode.UNAUTHENTICATED, "MHV-004")
    error = await _refused_within_deadline(call, md)
    assert (error.code(), mhv_code(error)) == expected, error.details()
    # And it stays refused: a refusal is never cached as a pass.
    again = await rpc_error(call(md))
    assert (again.code(), mhv_code(again)) == expected


async def test_a_token_for_a_user_that_never_existed_is_refused_everywhere(
    channels: dict[str, aio.Channel], keys: Keys
) -> None:
    for service, (role, call) in _calls(channels).items():
        md = bearer(keys.token(role, subject="00000000-0000-4000-8000-000000000000"))
        error = await rpc_error(call(md))
        assert (error.code(), mhv_code(error)) == (grpc.StatusCode.UNAUTHENTICATED, "MHV-004"), (
            service
        )


async def test_services_act_without_a_user_check(
    channels: dict[str, aio.Channel], keys: Keys
) -> None:
    # A service principal has no user row; it acts for users it names, checked per call.
    tasks = task_pb2_grpc.TaskServiceStub(channels["task"])
    await tasks.ListTasks(
        task_pb2.ListTasksRequest(page_size=1),
        metadata=bearer(keys.token(Role.SERVICE, subject="service:webhook")),
    )


async def test_revocation_fails_closed_when_the_task_service_cannot_be_asked(
    cluster: Cluster, keys: Keys, tmp_path: Path, services: Services
) -> None:
    # An audit service whose task service is a closed port: people are refused as
    # unavailable, never let through unchecked.
    unreachable = task_users_env("127.0.0.1:1", services.ca_file)
    async with (
        private_audit(cluster, keys, tmp_path, task_users=unreachable) as audit,
        aio.insecure_channel(audit.target) as channel,
    ):
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        error = await rpc_error(
            stub.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(page_size=1),
                metadata=bearer(keys.token(Role.AUDITOR)),
            )
        )
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.UNAVAILABLE, "MHV-009")
