"""Fixtures for the task service tests: people with roles, stubs, and a database handle.

Semantic search's fixtures (the local model, a cluster with pgvector) are in tests/conftest.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import pytest
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role, ServiceCredentials
from mhv_common.config import load_repositories
from tests.conftest import Services
from tests.harness import ROOT, Deployment, Keys, bearer, grpc_channel, make_user

# The repositories the test services are configured with.
REPOSITORIES = load_repositories(ROOT / "settings" / "repos.yaml")


@dataclass(frozen=True)
class Person:
    """A user row and a token for it with one role.

    `credentials` gives the current token: a person's lasts the session, a service's is
    re-minted before it expires (service tokens live minutes).
    """

    id: str
    username: str
    role: Role
    credentials: str | Callable[[], str]

    @property
    def token(self) -> str:
        return self.credentials if isinstance(self.credentials, str) else self.credentials()

    def md(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (*bearer(self.token), *extra)


@dataclass(frozen=True)
class People:
    admin: Person
    alice: Person  # member
    bob: Person  # member
    viewer: Person
    auditor: Person
    service: Person  # the webhook gateway; acts on behalf of alice unless told otherwise

    def for_service(self, on_behalf_of: str) -> tuple[tuple[str, str], ...]:
        return self.service.md(("x-mhv-on-behalf-of", on_behalf_of))


@pytest.fixture(scope="session")
async def people(deployment: Deployment, keys: Keys) -> People:
    suffix = uuid.uuid4().hex[:6]

    async def person(name: str, role: Role) -> Person:
        uid = await make_user(deployment, f"{name}-{suffix}")
        token = keys.token(role, subject=uid)
        return Person(uid, f"{name}-{suffix}", role, lambda: token)

    return People(
        admin=await person("admin", Role.ADMIN),
        alice=await person("alice", Role.MEMBER),
        bob=await person("bob", Role.MEMBER),
        viewer=await person("victor", Role.VIEWER),
        auditor=await person("audrey", Role.AUDITOR),
        service=Person(
            "service:webhook",
            "service",
            Role.SERVICE,
            ServiceCredentials(keys.issuer, service_name="webhook").token,
        ),
    )


@pytest.fixture(scope="session")
async def task_channel(services: Services) -> AsyncIterator[aio.Channel]:
    async with grpc_channel(services.task.target, services.ca_file) as channel:
        yield channel


@pytest.fixture(scope="session")
def tasks(task_channel: aio.Channel) -> task_pb2_grpc.TaskServiceStub:
    return task_pb2_grpc.TaskServiceStub(task_channel)


@pytest.fixture(scope="session")
def users(task_channel: aio.Channel) -> task_pb2_grpc.UserServiceStub:
    return task_pb2_grpc.UserServiceStub(task_channel)


@pytest.fixture
async def db(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    """An administrator connection for looking behind the API."""
    conn = await asyncpg.connect(deployment.admin_url)
    yield conn
    await conn.close()


async def new_task(
    tasks: task_pb2_grpc.TaskServiceStub, who: Person, **fields: object
) -> task_pb2.Task:
    request = task_pb2.CreateTaskRequest(
        title=str(fields.pop("title", "A task")),
        repository=str(fields.pop("repository", "demo")),
        **fields,  # type: ignore[arg-type]
    )
    task: task_pb2.Task = await tasks.CreateTask(request, metadata=who.md())
    return task
