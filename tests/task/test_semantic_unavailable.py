"""A server without pgvector: semantic and hybrid search refused with MHV-118, keyword works.

The database comes from a PostgreSQL server that does not offer pgvector: the run's own
cluster when it lacks it, else the shared server on 5432 (Debian's PostgreSQL 15 has none).
Only where neither exists is a pgvector server used with the task slice migrated back below
the pgvector migrations, which leaves the task schema exactly as a server without pgvector has
it (the migration runner holds those migrations back there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from mahavishnu.task.v1 import task_pb2
from mhv_cli.migrate import migrate_down
from tests.harness import LOCAL_URL, Cluster, Deployment, Keys, metric, mhv_code, rpc_error
from tests.task.semantic import (
    HYBRID,
    KEYWORD,
    SEMANTIC,
    UNSPECIFIED,
    SemanticService,
    embedding_env,
    ids,
    semantic_service,
)

pytestmark = pytest.mark.slow


async def _offers_pgvector(url: str) -> bool | None:
    """Whether the server at `url` offers pgvector (None: unreachable)."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return None
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
            )
        )
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def plain_deployment(cluster: Cluster) -> AsyncIterator[Deployment]:
    if await _offers_pgvector(cluster.admin_url) is False:
        chosen = cluster
    elif (
        os.environ.get("MHV_TEST_DATABASE_URL") is None
        and await _offers_pgvector(LOCAL_URL) is False
    ):
        chosen = Cluster(LOCAL_URL)
    else:
        chosen = None
    if chosen is not None:
        created = await Deployment.create(chosen)
    else:
        created = await Deployment.create(cluster)
        await migrate_down(
            created.admin_url,
            slice_name="task",
            to_version=2,
            roles=created.roles,
            allow_data_loss=True,
        )
    yield created
    await created.drop()


@pytest.fixture(scope="module")
async def service(
    plain_deployment: Deployment, keys: Keys, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[SemanticService]:
    async with semantic_service(
        plain_deployment,
        keys,
        Path(tmp_path_factory.mktemp("no-pgvector")),
        extra=embedding_env(None),
    ) as running:
        yield running


@pytest.mark.parametrize("mode", [SEMANTIC, HYBRID])
async def test_semantic_and_hybrid_answer_failed_precondition(
    service: SemanticService, mode: int
) -> None:
    port = service.process.metrics_port
    before = await metric(port, "semantic_search_total", {"status": "rejected"})
    error = await rpc_error(
        service.tasks.SearchTasks(
            task_pb2.SearchTasksRequest(query="login page crashes on Safari", mode=mode),
            metadata=service.people["viewer"].md(),
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mhv_code(error) == "MHV-118"
    assert "SEARCH_MODE_KEYWORD" in (error.details() or "")
    assert await metric(port, "semantic_search_total", {"status": "rejected"}) == before + 1


async def test_keyword_search_keeps_working_and_is_the_default(service: SemanticService) -> None:
    task = await service.create("Rotate the okapi certificates", "Before they expire.")
    for mode in (KEYWORD, UNSPECIFIED):
        reply = await service.search("okapi certificates", mode)
        assert reply.mode == KEYWORD
        assert ids(reply) == [task.id]
        assert list(reply.results[0].matched) == [KEYWORD]
        assert reply.results[0].score == reply.results[0].rank > 0


async def test_the_startup_log_and_validate_config_say_so(
    service: SemanticService, plain_deployment: Deployment
) -> None:
    assert "semantic search unavailable" in service.process.logs()
    assert "MHV-118" in service.process.logs()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
    result = subprocess.run(
        [sys.executable, "-m", "mhv_cli.main", "validate-config"],
        env={**clean, "MHV_TASK_DATABASE_URL": plain_deployment.role_url("task")},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "semantic search: unavailable" in result.stdout
    assert "embeddings: local sentence-transformers/all-MiniLM-L6-v2" in result.stdout
