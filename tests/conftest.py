"""Session fixtures: one PostgreSQL cluster, one migrated throw-away database, one key pair."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    service_env,
    start_order_ports,
    webhook_env,
)


@pytest.fixture(scope="session")
async def cluster() -> AsyncIterator[Cluster]:
    """The PostgreSQL cluster for the whole run."""
    found = await Cluster.find()
    yield found
    await found.close()


@pytest.fixture(scope="session")
async def deployment(cluster: Cluster) -> AsyncIterator[Deployment]:
    """A migrated database with its own roles, dropped at the end of the run."""
    created = await Deployment.create(cluster)
    yield created
    await created.drop()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The token signing key the services trust."""
    return Keys.create(Path(tmp_path_factory.mktemp("keys")))


@dataclass
class Services:
    """The three services running as separate processes against the session database."""

    task: ServiceProcess
    audit: ServiceProcess
    webhook: ServiceProcess
    ports: dict[str, int]
    env: dict[str, str]


@pytest.fixture(scope="session")
async def services(
    deployment: Deployment, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Services]:
    """Task, audit and webhook services as real processes (started once per run)."""
    logs = Path(tmp_path_factory.mktemp("service-logs"))
    ports = start_order_ports()
    common = {
        "MHV_TASK_GRPC_PORT": str(ports["task_grpc"]),
        "MHV_TASK_METRICS_PORT": str(ports["task_metrics"]),
        "MHV_AUDIT_GRPC_PORT": str(ports["audit_grpc"]),
        "MHV_AUDIT_METRICS_PORT": str(ports["audit_metrics"]),
        "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(ports["webhook_grpc"]),
        "MHV_WEBHOOK_METRICS_PORT": str(ports["webhook_metrics"]),
        "MHV_WEBHOOK_HTTPS_PORT": str(ports["webhook_https"]),
        "MHV_AUDIT_TARGET": f"127.0.0.1:{ports['audit_grpc']}",
        "MHV_TASK_TARGET": f"127.0.0.1:{ports['task_grpc']}",
        **webhook_env(Path(tmp_path_factory.mktemp("webhook-state"))),
    }
    env = service_env(deployment, keys, common)
    running = Services(
        task=ServiceProcess(
            "mhv_task", env, ports["task_grpc"], ports["task_metrics"], logs / "task.log"
        ),
        audit=ServiceProcess(
            "mhv_audit", env, ports["audit_grpc"], ports["audit_metrics"], logs / "audit.log"
        ),
        webhook=ServiceProcess(
            "mhv_webhook",
            env,
            ports["webhook_grpc"],
            ports["webhook_metrics"],
            logs / "webhook.log",
        ),
        ports=ports,
        env=env,
    )
    for process in (running.audit, running.task, running.webhook):
        await process.start()
    yield running
    for process in (running.webhook, running.task, running.audit):
        process.stop()
