"""Session fixtures: one PostgreSQL cluster, one migrated throw-away database, one key pair;
for semantic search the local model (loaded once per run) and a cluster that offers pgvector."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from hypothesis import settings

from mhv_cli.devstate import DevState
from mhv_task._embedding_local import LocalEmbedder
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    ports_env,
    register_people,
    service_env,
    start_order_ports,
    stop_all,
    webhook_env,
)

# The suite is a gate: property tests draw the same examples on every run, so a red run is
# reproducible and none turns red by luck. `pytest --hypothesis-profile=explore` draws fresh
# ones (run it when touching parsers, verifiers or the canonical encoding).
settings.register_profile("gate", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("gate")


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
    """The three services running as separate processes against the session database.

    They serve gRPC over TLS only, each with its own certificate from a private CA (`ca_file`),
    and call each other over TLS, as `mhv up` runs them.
    """

    task: ServiceProcess
    audit: ServiceProcess
    webhook: ServiceProcess
    ports: dict[str, int]
    env: dict[str, str]
    ca_file: Path


@pytest.fixture(scope="session")
async def services(
    deployment: Deployment, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Services]:
    """Task, audit and webhook services as real processes (started once per run)."""
    logs = Path(tmp_path_factory.mktemp("service-logs"))
    await register_people(deployment, keys)
    state = DevState(Path(tmp_path_factory.mktemp("grpc-tls")))
    state.ensure_grpc_tls()
    ports = start_order_ports()
    common = {
        **ports_env(ports),
        **webhook_env(Path(tmp_path_factory.mktemp("webhook-state"))),
        "MHV_GRPC_TLS_CA_FILE": str(state.grpc_ca),
    }
    env = service_env(deployment, keys, common)

    def process(service: str) -> ServiceProcess:
        own = {
            **env,
            "MHV_GRPC_TLS_CERT_FILE": str(state.grpc_cert(service)),
            "MHV_GRPC_TLS_KEY_FILE": str(state.grpc_key(service)),
        }
        return ServiceProcess(
            f"mhv_{service}",
            own,
            ports[f"{service}_grpc"],
            ports[f"{service}_metrics"],
            logs / f"{service}.log",
            ca_file=state.grpc_ca,
        )

    running = Services(
        task=process("task"),
        audit=process("audit"),
        webhook=process("webhook"),
        ports=ports,
        env=env,
        ca_file=state.grpc_ca,
    )
    for process in (running.audit, running.task, running.webhook):
        await process.start()
    yield running
    stop_all([running.webhook, running.task, running.audit])


@pytest.fixture(scope="session")
async def local_embedder() -> AsyncIterator[LocalEmbedder]:
    """all-MiniLM-L6-v2 from the installed package (a few seconds to load; shared)."""
    embedder = LocalEmbedder.load()
    yield embedder
    await embedder.aclose()


@pytest.fixture(scope="session")
async def vector_cluster(cluster: Cluster) -> AsyncIterator[Cluster]:
    """A cluster that offers pgvector: the run's own, else a private one (which ships it)."""
    conn = await asyncpg.connect(cluster.admin_url)
    try:
        offered = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        )
    finally:
        await conn.close()
    if offered:
        yield cluster
        return
    private = await Cluster.start_private()
    try:
        yield private
    finally:
        await private.close()


@pytest.fixture(scope="session")
async def vector_deployment(vector_cluster: Cluster) -> AsyncIterator[Deployment]:
    """A migrated database with pgvector enabled, dropped at the end of the run."""
    created = await Deployment.create(vector_cluster)
    yield created
    await created.drop()
