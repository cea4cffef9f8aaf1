"""Operators' view: grpcurl lists, describes and calls every RPC through server reflection.

The services serve TLS only, so grpcurl trusts their CA as an operator's would.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor

from mahavishnu.audit.v1 import audit_pb2
from mahavishnu.task.v1 import task_pb2
from mahavishnu.webhook.v1 import webhook_pb2
from mhv_common.auth import Role
from tests.conftest import Services
from tests.harness import Keys

GRPCURL = Path(sys.executable).parent / "grpcurl"

SERVICES: list[tuple[str, descriptor.ServiceDescriptor, Role]] = [
    ("task", task_pb2.DESCRIPTOR.services_by_name["TaskService"], Role.ADMIN),
    ("task", task_pb2.DESCRIPTOR.services_by_name["UserService"], Role.ADMIN),
    ("audit", audit_pb2.DESCRIPTOR.services_by_name["AuditService"], Role.ADMIN),
    ("webhook", webhook_pb2.DESCRIPTOR.services_by_name["WebhookAdminService"], Role.ADMIN),
]


# What each RPC answers an administrator sending an empty request: an answer ("OK") or the one
# catalog code it must refuse with. Empty ids, titles, queries and batches are invalid
# (MHV-003), so that is every RPC's outcome but the listings', which answer.
EMPTY_REQUEST_EXCEPTIONS: dict[str, str] = {
    "mahavishnu.task.v1.TaskService/ListTasks": "OK",
    "mahavishnu.task.v1.UserService/ListUsers": "OK",
    "mahavishnu.audit.v1.AuditService/ListAuditEvents": "OK",
    "mahavishnu.audit.v1.AuditService/VerifyAuditChain": "OK",
    "mahavishnu.webhook.v1.WebhookAdminService/ListDeliveries": "OK",
}


def empty_request_outcome(name: str) -> str:
    """The outcome of an empty request to the RPC `name` (``pkg.Service/Method``)."""
    return EMPTY_REQUEST_EXCEPTIONS.get(name, "MHV-003")


async def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(GRPCURL), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _target(services: Services, name: str) -> str:
    return getattr(services, name).target


def _tls(services: Services) -> tuple[str, str]:
    return ("-cacert", str(services.ca_file))


@pytest.mark.parametrize(
    ("process", "service", "role"), SERVICES, ids=lambda x: getattr(x, "full_name", x)
)
async def test_list_and_describe_every_rpc(
    services: Services, process: str, service: descriptor.ServiceDescriptor, role: Role
) -> None:
    target = _target(services, process)
    listed = await grpcurl(*_tls(services), target, "list", service.full_name)
    assert listed.returncode == 0, listed.stderr
    assert {line.strip() for line in listed.stdout.splitlines()} == {
        f"{service.full_name}.{m.name}" for m in service.methods
    }
    for method in service.methods:
        described = await grpcurl(
            *_tls(services), target, "describe", f"{service.full_name}.{method.name}"
        )
        assert described.returncode == 0, described.stderr
        assert f"rpc {method.name} (" in described.stdout
        message = await grpcurl(*_tls(services), target, "describe", method.input_type.full_name)
        assert message.returncode == 0 and "message" in message.stdout


@pytest.mark.parametrize(
    ("process", "service", "role"), SERVICES, ids=lambda x: getattr(x, "full_name", x)
)
async def test_call_every_rpc(
    services: Services,
    keys: Keys,
    process: str,
    service: descriptor.ServiceDescriptor,
    role: Role,
) -> None:
    target = _target(services, process)
    for method in service.methods:
        name = f"{service.full_name}/{method.name}"
        result = await grpcurl(
            *_tls(services),
            "-H",
            f"authorization: Bearer {keys.token(role)}",
            "-d",
            json.dumps({}),
            target,
            name,
        )
        # The answer, or the one Mahavishnu error this request deserves: never another code, a
        # transport failure, a reflection failure or an unmapped error.
        output = result.stdout + result.stderr
        found = re.search(r"Message: \[(MHV-\d{3})\]", output)
        outcome = "OK" if result.returncode == 0 else (found.group(1) if found else output)
        assert outcome == empty_request_outcome(name), (name, result)


def test_every_exception_names_an_rpc() -> None:
    assert set(EMPTY_REQUEST_EXCEPTIONS) <= {
        f"{service.full_name}/{m.name}" for _p, service, _r in SERVICES for m in service.methods
    }
