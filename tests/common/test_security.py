"""The security log and `mhv_authz_denied_total`: every refused call, once, through real services.

Refusals at the shared interceptors (no token, a forged one, a role the method does not allow)
and in a service's own checks (a service recording what it does not own) each leave one JSON
line on the ``mhv.security`` logger and one count, and nothing the caller sent but who they were.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import pytest

from mahavishnu.audit.v1 import audit_pb2
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from tests.audit.support import event, random_task_id
from tests.audit.support import stub as audit_stub
from tests.conftest import Services
from tests.harness import Keys, ServiceProcess, bearer, grpc_channel, metric, rpc_error

TASKS = "mahavishnu.task.v1.TaskService"
USERS = "mahavishnu.task.v1.UserService"
AUDIT = "mahavishnu.audit.v1.AuditService"


def _denied(service: str, method: str, reason: str) -> dict[str, str]:
    return {"service": service, "method": method, "reason": reason}


async def _security_lines(process: ServiceProcess, request_ids: set[str]) -> list[dict[str, Any]]:
    """The security log lines of these requests, once every one of them has been written."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30
    while True:
        lines = [
            entry
            for line in process.logs().splitlines()
            if line.startswith("{")
            and (entry := json.loads(line)).get("logger") == "mhv.security"
            and entry.get("request_id") in request_ids
        ]
        if {e["request_id"] for e in lines} == request_ids:
            return lines
        assert loop.time() < give_up, f"security log lines so far: {lines}"
        await asyncio.sleep(0.1)


@pytest.mark.usefixtures("services")
async def test_refused_calls_are_logged_once_each_and_counted(
    services: Services, keys: Keys
) -> None:
    secret = f"sk-live-{uuid.uuid4().hex}"
    viewer = str(uuid.uuid4())
    ids = {name: uuid.uuid4().hex for name in ("none", "forged", "role")}
    # Label set -> refusals expected: the call without a token and the forged one count alike.
    counted = {
        "unauthenticated": (_denied(TASKS, "GetTask", "MHV-004"), 2),
        "role": (_denied(USERS, "CreateUser", "MHV-005"), 1),
    }
    port = services.task.metrics_port
    before = {k: await metric(port, "mhv_authz_denied_total", v) for k, (v, _) in counted.items()}
    async with grpc_channel(services.task.target, services.ca_file) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        users = task_pb2_grpc.UserServiceStub(channel)
        calls = {
            "none": tasks.GetTask(
                task_pb2.GetTaskRequest(id=1), metadata=(("x-request-id", ids["none"]),)
            ),
            "forged": tasks.GetTask(
                task_pb2.GetTaskRequest(id=1),
                metadata=(("authorization", f"Bearer {secret}"), ("x-request-id", ids["forged"])),
            ),
            "role": users.CreateUser(
                task_pb2.CreateUserRequest(username="mallory", email="m@example.test"),
                metadata=(
                    *bearer(keys.token(Role.VIEWER, subject=viewer)),
                    ("x-request-id", ids["role"]),
                ),
            ),
        }
        codes = {name: (await rpc_error(call)).code() for name, call in calls.items()}
    assert codes == {
        "none": grpc.StatusCode.UNAUTHENTICATED,
        "forged": grpc.StatusCode.UNAUTHENTICATED,
        "role": grpc.StatusCode.PERMISSION_DENIED,
    }
    lines = await _security_lines(services.task, set(ids.values()))
    by_request = {line["request_id"]: line for line in lines}
    assert len(lines) == len(by_request) == 3, lines
    role = by_request[ids["role"]]
    assert (role["error_code"], role["grpc_code"]) == ("MHV-005", "PERMISSION_DENIED")
    assert (role["rpc_service"], role["rpc_method"], role["subject"]) == (
        USERS,
        "CreateUser",
        viewer,
    )
    for name in ("none", "forged"):
        line = by_request[ids[name]]
        assert (line["error_code"], line["subject"], line["rpc_method"]) == (
            "MHV-004",
            "",
            "GetTask",
        )
        assert line["event"] == "authz_denied" and line["peer"]
    assert secret not in services.task.logs()
    for name, (labels, count) in counted.items():
        assert await metric(port, "mhv_authz_denied_total", labels) == before[name] + count


async def test_a_refusal_by_a_services_own_check_is_logged_too(
    services: Services, keys: Keys
) -> None:
    """The gateway may not write task history: the audit service's edge refuses, and logs it."""
    request_id = uuid.uuid4().hex
    labels = _denied(AUDIT, "RecordEvents", "MHV-005")
    before = await metric(services.audit.metrics_port, "mhv_authz_denied_total", labels)
    async with grpc_channel(services.audit.target, services.ca_file) as channel:
        error = await rpc_error(
            audit_stub(channel).RecordEvents(
                audit_pb2.RecordEventsRequest(events=[event(random_task_id())]),
                metadata=(
                    *bearer(keys.token(Role.SERVICE, subject="service:webhook")),
                    ("x-request-id", request_id),
                ),
            )
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    (line,) = await _security_lines(services.audit, {request_id})
    assert (line["subject"], line["rpc_method"]) == ("service:webhook", "RecordEvents")
    after = await metric(services.audit.metrics_port, "mhv_authz_denied_total", labels)
    assert after == before + 1
