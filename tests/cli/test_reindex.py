"""`mhv reindex`: a model switch, interrupted and resumed, then searched through the service.

The deployment starts on the local model (the task service's worker embeds every task with
it). `mhv reindex` then runs with a remote provider configured under another model name (the
local stand-in for a third-party API, `tests.task.embedding.stub`, serving the same weights),
is interrupted with SIGINT mid-way and run again; the task service restarted with the new
settings searches the new model's vectors, and `mhv reindex --prune` removes the old ones.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import asyncpg
import pytest

from mhv_task._embedding import LOCAL_MODEL
from mhv_task._embedding_local import LocalEmbedder
from tests.harness import Cluster, Deployment, Keys, metric
from tests.task.embedding.stub import RemoteEmbeddingsStub, remote_embeddings_stub
from tests.task.semantic import (
    KEYWORD,
    SEMANTIC,
    embedding_env,
    ids,
    semantic_service,
    wait_until_embedded,
)

pytestmark = pytest.mark.slow

NEW_MODEL = "example/all-minilm-l6-v2-served"
TASKS = [
    ("Fix authentication failure in WebKit browsers", "Safari users are sent back to sign-in."),
    ("Speed up the nightly billing export", "The invoice CSV job takes four hours."),
    ("Add a dark theme to the settings screen", "People working at night want it."),
    ("Rotate the database credentials", "The passwords are two years old."),
    ("Upgrade the message queue", "The broker version is out of support."),
    ("Translate the help pages into German", "Customers in Berlin asked for it."),
    ("Cache the pricing table", "Every checkout reads it again from the database."),
    ("Remove the legacy reports tab", "Nobody opened it this year."),
    ("Alert when disks fill up", "A full disk stopped the build server last week."),
    ("Shorten the sign-up form", "Half of the visitors give up at the address step."),
    ("Document the release process", "Only one person knows how to cut a release."),
    ("Retry failed webhook deliveries", "Deliveries are lost when the receiver restarts."),
]


@pytest.fixture(scope="module")
async def deployment(vector_cluster: Cluster) -> AsyncIterator[Deployment]:
    created = await Deployment.create(vector_cluster)
    yield created
    await created.drop()


@pytest.fixture(scope="module")
async def stub(local_embedder: LocalEmbedder) -> AsyncIterator[RemoteEmbeddingsStub]:
    async with remote_embeddings_stub(local_embedder) as running:
        yield running


async def _mhv(
    args: list[str], env: Mapping[str, str], *, interrupt_after: str | None = None
) -> tuple[int, str]:
    """Run ``mhv`` (asynchronously: the stand-in API answers from this event loop)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mhv_cli.main",
        *args,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(300):
        while line := (await process.stdout.readline()).decode():
            lines.append(line)
            if interrupt_after is not None and re.search(interrupt_after, line):
                process.send_signal(signal.SIGINT)
                interrupt_after = None
        code = await process.wait()
    return code, "".join(lines)


async def _vectors(deployment: Deployment, model: str) -> int:
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM task.task_embeddings WHERE model = $1", model
        )
        return count
    finally:
        await conn.close()


async def test_a_model_switch_interrupted_resumed_and_searched(
    deployment: Deployment,
    keys: Keys,
    stub: RemoteEmbeddingsStub,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = Path(tmp_path_factory.mktemp("reindex"))
    async with semantic_service(deployment, keys, folder, extra=embedding_env(None)) as local:
        made = [await local.create(title, description) for title, description in TASKS]
        await wait_until_embedded(deployment, [t.id for t in made])
        people = local.people
    assert await _vectors(deployment, NEW_MODEL) == 0

    env = {"MHV_DATABASE_URL": deployment.admin_url, **embedding_env(stub.url, model=NEW_MODEL)}
    # Slow enough that the interruption lands mid-way.
    stub.behaviour.delay = 0.3
    code, output = await _mhv(
        ["reindex", "--batch-size", "2"], env, interrupt_after=r"^\s+2/\d+ tasks"
    )
    assert code == 130, output
    assert f"reindex: {len(TASKS)} tasks to embed" in output
    assert "interrupted" in output
    partial = await _vectors(deployment, NEW_MODEL)
    assert 0 < partial < len(TASKS)

    stub.behaviour.delay = 0.0
    code, output = await _mhv(["reindex", "--batch-size", "4"], env)
    assert code == 0, output
    assert f"reindex: {len(TASKS) - partial} tasks to embed" in output
    assert f"{len(TASKS) - partial}/{len(TASKS) - partial} tasks (100.0 %)" in output
    assert await _vectors(deployment, NEW_MODEL) == len(TASKS)
    assert await _vectors(deployment, LOCAL_MODEL) == len(TASKS)
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'task' AND indexdef LIKE $1",
            f"%{NEW_MODEL}%",
        )
    finally:
        await conn.close()
    assert index is not None and "hnsw" in index

    # Nothing left to do: a run that finds everything current embeds nothing.
    code, output = await _mhv(["reindex"], env)
    assert code == 0 and "reindex: 0 tasks to embed" in output

    service_env = embedding_env(stub.url, model=NEW_MODEL)
    async with semantic_service(
        deployment, keys, folder, extra=service_env, people=people
    ) as switched:
        port = switched.process.metrics_port
        labels = {"purpose": "query", "outcome": "remote"}
        before = await metric(port, "task_embedding_requests_total", labels)
        reply = await switched.search("login page crashes on Safari", SEMANTIC)
        assert ids(reply)[0] == made[0].id
        assert await metric(port, "task_embedding_requests_total", labels) == before + 1

        code, output = await _mhv(["reindex", "--prune"], env)
        assert code == 0, output
        assert f"reindex: pruned {len(TASKS)} vectors of {LOCAL_MODEL}" in output
        assert await _vectors(deployment, LOCAL_MODEL) == 0
        reply = await switched.search("login page crashes on Safari", SEMANTIC)
        assert ids(reply)[0] == made[0].id

        # The remote down, queries are embedded by the local model, whose vectors are gone:
        # they are never compared with the new model's, so nothing is found by meaning.
        stub.behaviour.failures = 1000
        reply = await switched.search("login page crashes on Safari", SEMANTIC)
        assert all(list(r.matched) == [KEYWORD] for r in reply.results)
        assert made[0].id not in ids(reply)
