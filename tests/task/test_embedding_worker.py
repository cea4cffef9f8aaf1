"""The embedding worker's claims, leases and generations, on a database of its own with pgvector.

The statements are the task store's own (`mhv_task._store_embeddings`), run as the task role,
the way the worker runs them; no service runs on this database, so nothing claims behind the
test's back. End-to-end embedding through the service: tests/task/test_semantic_search.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import numpy as np
import pytest

from mhv_task import _store_embeddings as vectors
from mhv_task._embedding import LOCAL_MODEL
from mhv_task._embedding_local import LocalEmbedder
from tests.harness import Cluster, Deployment
from tests.task.conftest import make_user


@pytest.fixture(scope="module")
async def worker_deployment(vector_cluster: Cluster) -> AsyncIterator[Deployment]:
    created = await Deployment.create(vector_cluster)
    yield created
    await created.drop()


@pytest.fixture
async def conn(worker_deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    """The task role's connection (search_path: the task schema), an empty backlog."""
    connection = await asyncpg.connect(worker_deployment.role_url("task"))
    await connection.execute("DELETE FROM embedding_backlog")
    yield connection
    await connection.close()


async def _task(conn: asyncpg.Connection, deployment: Deployment, title: str) -> int:
    user = await make_user(deployment, f"w-{title[:8].replace(' ', '')}-{id(conn) % 9999}")
    task_id: int = await conn.fetchval(
        "INSERT INTO tasks (title, description, repository, created_by)"
        " VALUES ($1, 'details', 'demo', $2) RETURNING id",
        title,
        user,
    )
    return task_id


async def _store(
    conn: asyncpg.Connection,
    embedder: LocalEmbedder,
    claimed: list[tuple[int, int, str]],
) -> int:
    embedded = await embedder.embed([text for _, _, text in claimed])
    return await vectors.store_claimed(
        conn, claimed=claimed, vectors=embedded.vectors, model=embedded.model, timeout=30
    )


async def test_a_task_edited_while_embedding_is_embedded_again(
    conn: asyncpg.Connection, worker_deployment: Deployment, local_embedder: LocalEmbedder
) -> None:
    task_id = await _task(conn, worker_deployment, "First title")
    claimed = await vectors.claim_backlog(conn, limit=10, lease_seconds=60, timeout=30)
    assert [(t, text) for t, _, text in claimed] == [(task_id, "First title\ndetails")]
    await conn.execute("UPDATE tasks SET title = 'Second title' WHERE id = $1", task_id)
    assert await _store(conn, local_embedder, claimed) == 1
    # The old text's vector is stored, but the row stays, unclaimed, one generation on.
    row = await conn.fetchrow(
        "SELECT generation, claimed_until FROM embedding_backlog WHERE task_id = $1", task_id
    )
    assert row is not None
    assert row["generation"] == claimed[0][1] + 1
    assert row["claimed_until"] is None
    again = await vectors.claim_backlog(conn, limit=10, lease_seconds=60, timeout=30)
    assert [(t, text) for t, _, text in again] == [(task_id, "Second title\ndetails")]
    await _store(conn, local_embedder, again)
    assert await conn.fetchval("SELECT count(*) FROM embedding_backlog") == 0
    digest = await conn.fetchval(
        "SELECT content_sha256 FROM task_embeddings WHERE task_id = $1 AND model = $2",
        task_id,
        LOCAL_MODEL,
    )
    assert bytes(digest) == vectors.content_digest("Second title\ndetails")


async def test_concurrent_claims_never_share_a_task_and_leases_expire(
    conn: asyncpg.Connection, worker_deployment: Deployment
) -> None:
    made = {await _task(conn, worker_deployment, f"Task {i}") for i in range(6)}
    other = await asyncpg.connect(worker_deployment.role_url("task"))
    try:
        first, second = await asyncio.gather(
            vectors.claim_backlog(conn, limit=4, lease_seconds=60, timeout=30),
            vectors.claim_backlog(other, limit=4, lease_seconds=60, timeout=30),
        )
        a, b = {t for t, _, _ in first}, {t for t, _, _ in second}
        assert not a & b
        assert a | b == made
        # Everything is under a lease: nothing more to claim.
        assert await vectors.claim_backlog(conn, limit=10, lease_seconds=60, timeout=30) == []
        # A worker that died leaves its rows; once the lease has run out they are claimable.
        await conn.execute(
            "UPDATE embedding_backlog SET claimed_until = now() - interval '1 second'"
            " WHERE task_id = ANY($1)",
            list(a),
        )
        again = await vectors.claim_backlog(other, limit=10, lease_seconds=60, timeout=30)
        assert {t for t, _, _ in again} == a
    finally:
        await other.close()


async def test_a_task_deleted_while_embedding_is_skipped(
    conn: asyncpg.Connection, worker_deployment: Deployment
) -> None:
    task_id = await _task(conn, worker_deployment, "Soon gone")
    claimed = await vectors.claim_backlog(conn, limit=10, lease_seconds=60, timeout=30)
    await conn.execute("DELETE FROM tasks WHERE id = $1", task_id)
    vector = np.ones((1, 384), dtype=np.float32) / np.sqrt(384, dtype=np.float32)
    async with conn.transaction():
        stored = await vectors.store_vectors(
            conn,
            task_ids=[task_id],
            texts=[claimed[0][2]],
            vectors=vector,
            model=LOCAL_MODEL,
            timeout=30,
        )
    assert stored == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM task_embeddings WHERE task_id = $1", task_id) == 0
    )


async def test_the_backlog_state_counts_and_ages(
    conn: asyncpg.Connection, worker_deployment: Deployment
) -> None:
    assert await vectors.backlog_state(conn, timeout=30) == (0, 0.0)
    task_id = await _task(conn, worker_deployment, "Waiting")
    await conn.execute(
        "UPDATE embedding_backlog SET enqueued_at = now() - interval '90 seconds'"
        " WHERE task_id = $1",
        task_id,
    )
    depth, age = await vectors.backlog_state(conn, timeout=30)
    assert depth == 1
    assert 90 <= age < 3600
