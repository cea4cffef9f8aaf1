"""A task service on a database with pgvector, for the semantic search tests.

The service runs as its own process over TLS, like the session's, but against a database
whose cluster offers pgvector (`vector_deployment`), and with a remote embeddings provider
configured: the local stand-in of `tests.task.embedding.stub` (the only stub these tests use,
for a third-party API this machine cannot reach). The stand-in answers with the real local
model's vectors under the same model name, as an OpenAI-compatible server running
all-MiniLM-L6-v2 would, so remote and local answers agree and a test can break the remote on
purpose without changing results.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.devstate import DevState
from mhv_common.auth import Role
from mhv_task._embedding import LOCAL_MODEL
from tests.harness import (
    Deployment,
    Keys,
    ServiceProcess,
    grpc_channel,
    ports_env,
    service_env,
    start_order_ports,
)
from tests.task.conftest import Person, make_user

SEMANTIC = task_pb2.SEARCH_MODE_SEMANTIC
HYBRID = task_pb2.SEARCH_MODE_HYBRID
KEYWORD = task_pb2.SEARCH_MODE_KEYWORD
UNSPECIFIED = task_pb2.SEARCH_MODE_UNSPECIFIED


@dataclass
class SemanticService:
    """The running task service, a stub for it, its people and a database handle."""

    process: ServiceProcess
    tasks: task_pb2_grpc.TaskServiceStub
    deployment: Deployment
    people: dict[str, Person]

    async def search(
        self, query: str, mode: int, *, who: str = "viewer", **fields: object
    ) -> task_pb2.SearchTasksResponse:
        request = task_pb2.SearchTasksRequest(query=query, mode=mode, **fields)  # type: ignore[arg-type]
        reply: task_pb2.SearchTasksResponse = await self.tasks.SearchTasks(
            request, metadata=self.people[who].md()
        )
        return reply

    async def create(self, title: str, description: str = "", **fields: object) -> task_pb2.Task:
        request = task_pb2.CreateTaskRequest(
            title=title,
            description=description,
            repository=str(fields.pop("repository", "demo")),
            **fields,  # type: ignore[arg-type]
        )
        task: task_pb2.Task = await self.tasks.CreateTask(
            request, metadata=self.people["alice"].md()
        )
        return task


async def _people(deployment: Deployment, keys: Keys) -> dict[str, Person]:
    suffix = uuid.uuid4().hex[:6]
    made: dict[str, Person] = {}
    for name, role in (
        ("alice", Role.MEMBER),
        ("viewer", Role.VIEWER),
        ("auditor", Role.AUDITOR),
        ("admin", Role.ADMIN),
    ):
        username = f"{name}-{suffix}"
        uid = await make_user(deployment, username)
        made[name] = Person(uid, username, role, keys.token(role, subject=uid))
    return made


def embedding_env(remote_url: str | None, *, model: str = LOCAL_MODEL) -> dict[str, str]:
    """Settings for the providers: the remote stand-in (quick to give up) and the worker."""
    env = {
        # Rounds back to back while there is work; a quick look for new work otherwise.
        "MHV_EMBEDDING_WORKER_POLL_SECONDS": "0.2",
        "MHV_EMBEDDING_WORKER_BATCH_SIZE": "16",
    }
    if remote_url is not None:
        env |= {
            "MHV_EMBEDDING_REMOTE_URL": remote_url,
            "MHV_EMBEDDING_REMOTE_MODEL": model,
            "MHV_EMBEDDING_REMOTE_API_KEY": "test-key",
            "MHV_EMBEDDING_REMOTE_TIMEOUT_SECONDS": "1.0",
            "MHV_EMBEDDING_REMOTE_ATTEMPTS": "1",
            # Open after 3 failures in a row, and stay open for the rest of the module.
            "MHV_EMBEDDING_REMOTE_BREAKER_FAILURES": "3",
            "MHV_EMBEDDING_REMOTE_BREAKER_RESET_SECONDS": "600",
        }
    return env


@asynccontextmanager
async def semantic_service(
    deployment: Deployment,
    keys: Keys,
    folder: Path,
    *,
    extra: Mapping[str, str],
    people: dict[str, Person] | None = None,
) -> AsyncIterator[SemanticService]:
    """Run a task service (relay off: no audit service here) on `deployment`."""
    state = DevState(folder / "grpc-tls")
    state.ensure_grpc_tls()
    ports = start_order_ports()
    env = service_env(
        deployment,
        keys,
        {
            **ports_env(ports),
            "MHV_GRPC_TLS_CA_FILE": str(state.grpc_ca),
            "MHV_GRPC_TLS_CERT_FILE": str(state.grpc_cert("task")),
            "MHV_GRPC_TLS_KEY_FILE": str(state.grpc_key("task")),
            "MHV_RELAY_ENABLED": "false",
            **extra,
        },
    )
    process = ServiceProcess(
        "mhv_task",
        env,
        ports["task_grpc"],
        ports["task_metrics"],
        folder / f"task-{ports['task_grpc']}.log",
        ca_file=state.grpc_ca,
    )
    # Loading the model takes a few seconds on a busy machine.
    await process.start(timeout=120.0)
    try:
        async with grpc_channel(process.target, state.grpc_ca) as channel:
            yield SemanticService(
                process,
                task_pb2_grpc.TaskServiceStub(channel),
                deployment,
                people if people is not None else await _people(deployment, keys),
            )
    finally:
        process.stop()


async def wait_until_embedded(
    deployment: Deployment,
    ids: Iterable[int],
    *,
    model: str = LOCAL_MODEL,
    timeout: float = 120.0,
) -> None:
    """Wait until each task has a vector of `model` for its current text, none queued."""
    wanted = list(ids)
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        while True:
            missing = await conn.fetchval(
                """
                SELECT count(*) FROM task.tasks t
                LEFT JOIN task.task_embeddings e ON e.task_id = t.id AND e.model = $2
                WHERE t.id = ANY($1) AND (
                    e.task_id IS NULL
                    OR e.content_sha256 <> sha256(convert_to(
                        t.title || E'\\n' || coalesce(t.description, ''), 'UTF8'))
                    OR EXISTS (SELECT 1 FROM task.embedding_backlog b WHERE b.task_id = t.id))
                """,
                wanted,
                model,
            )
            if missing == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{missing} of {len(wanted)} tasks still not embedded")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def ids(reply: task_pb2.SearchTasksResponse) -> list[int]:
    """The task ids of a search reply, in order."""
    return [r.task.id for r in reply.results]
