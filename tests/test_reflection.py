"""Operators' view: grpcurl lists, describes and calls every RPC through server reflection.

The services serve TLS only, so grpcurl trusts their CA as an operator's would.
"""

from __future__ import annotations

import asyncio
import json
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
        result = await grpcurl(
            *_tls(services),
            "-H",
            f"authorization: Bearer {keys.token(role)}",
            "-d",
            json.dumps({}),
            target,
            f"{service.full_name}/{method.name}",
        )
        # Either an answer, or a Mahavishnu error with its code: never a transport failure,
        # a reflection failure or an unmapped error.
        if result.returncode != 0:
            assert "Message: [MHV-" in result.stdout + result.stderr, (method.name, result)
