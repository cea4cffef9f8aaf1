"""pgvector storage for task embeddings (migrations task/0003 and 0004) on a server that has it."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import numpy as np
import pytest

from tests.harness import Deployment

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
OTHER_MODEL = "example/other-768"


def literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def unit(rng: np.random.Generator, dims: int = 384) -> np.ndarray:
    v = rng.standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture
async def task_db(vector_deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    """The task role's connection, with a user to own tasks."""
    conn = await asyncpg.connect(vector_deployment.role_url("task"))
    name = f"embed-{uuid.uuid4().hex[:8]}"
    user = await conn.fetchval(
        "INSERT INTO users (username, email) VALUES ($1, $2) RETURNING id",
        name,
        f"{name}@example.com",
    )
    await conn.execute("SELECT set_config('mhv.test_user', $1, false)", str(user))
    yield conn
    await conn.close()


async def new_task(conn: asyncpg.Connection, title: str, description: str = "") -> int:
    user = await conn.fetchval("SELECT current_setting('mhv.test_user')::uuid")
    task_id: int = await conn.fetchval(
        "INSERT INTO tasks (title, description, repository, created_by)"
        " VALUES ($1, $2, 'demo', $3) RETURNING id",
        title,
        description,
        user,
    )
    return task_id


async def store(conn: asyncpg.Connection, task_id: int, vector: np.ndarray, model: str) -> None:
    await conn.execute(
        "INSERT INTO task_embeddings (task_id, model, dimensions, embedding, content_sha256)"
        " VALUES ($1, $2, $3, $4::vector, $5)",
        task_id,
        model,
        len(vector),
        literal(vector),
        hashlib.sha256(str(task_id).encode()).digest(),
    )


async def test_pgvector_lives_in_the_task_schema(vector_deployment: Deployment) -> None:
    conn = await asyncpg.connect(vector_deployment.admin_url)
    try:
        schema = await conn.fetchval(
            "SELECT n.nspname FROM pg_extension e"
            " JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
        )
        owners = dict(
            await conn.fetch(
                "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'task'"
                " AND tablename IN ('task_embeddings', 'embedding_backlog')"
            )
        )
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes"
            " WHERE indexname = 'task_embeddings_hnsw_all_minilm_l6_v2'"
        )
    finally:
        await conn.close()
    assert schema == "task"
    assert owners == dict.fromkeys(
        ("task_embeddings", "embedding_backlog"), vector_deployment.roles.for_slice("task")
    )
    assert "USING hnsw" in index
    assert "vector_cosine_ops" in index
    assert f"WHERE (model = '{MODEL}'::text)" in index


async def test_backlog_follows_changes_to_the_text(task_db: asyncpg.Connection) -> None:
    task_id = await new_task(task_db, "Embed me", "first text")

    async def generation() -> int | None:
        value: int | None = await task_db.fetchval(
            "SELECT generation FROM embedding_backlog WHERE task_id = $1", task_id
        )
        return value

    assert await generation() == 1
    await task_db.execute("UPDATE tasks SET status = 'in_progress' WHERE id = $1", task_id)
    await task_db.execute("UPDATE tasks SET title = title WHERE id = $1", task_id)
    assert await generation() == 1  # no text changed
    # A worker claims the row, and the description changes while it is embedding.
    await task_db.execute(
        "UPDATE embedding_backlog SET claimed_until = now() + interval '1 minute'"
        " WHERE task_id = $1",
        task_id,
    )
    await task_db.execute("UPDATE tasks SET description = 'second text' WHERE id = $1", task_id)
    assert await generation() == 2
    assert await task_db.fetchval(
        "SELECT claimed_until IS NULL FROM embedding_backlog WHERE task_id = $1", task_id
    )
    # Finishing the claim of generation 1 leaves the task queued for its new text...
    done = await task_db.execute(
        "DELETE FROM embedding_backlog WHERE task_id = $1 AND generation = 1", task_id
    )
    assert done == "DELETE 0"
    # ...and finishing generation 2 empties the queue.
    await task_db.execute(
        "DELETE FROM embedding_backlog WHERE task_id = $1 AND generation = 2", task_id
    )
    assert await generation() is None
    await task_db.execute("UPDATE tasks SET title = 'Embed me again' WHERE id = $1", task_id)
    assert await generation() == 1


async def test_each_vector_carries_its_model_and_length(task_db: asyncpg.Connection) -> None:
    rng = np.random.default_rng(7)
    task_id = await new_task(task_db, "Two models")
    await store(task_db, task_id, unit(rng), MODEL)
    await store(task_db, task_id, unit(rng, 768), OTHER_MODEL)
    rows = await task_db.fetch(
        "SELECT model, dimensions, vector_dims(embedding) AS n FROM task_embeddings"
        " WHERE task_id = $1 ORDER BY model",
        task_id,
    )
    assert [tuple(r) for r in rows] == [(OTHER_MODEL, 768, 768), (MODEL, 384, 384)]
    with pytest.raises(asyncpg.CheckViolationError):
        await task_db.execute(
            "INSERT INTO task_embeddings (task_id, model, dimensions, embedding, content_sha256)"
            " VALUES ($1, 'liar', 384, $2::vector, $3)",
            task_id,
            literal(unit(rng, 10)),
            bytes(32),
        )
    await task_db.execute("DELETE FROM tasks WHERE id = $1", task_id)
    assert (
        await task_db.fetchval("SELECT count(*) FROM task_embeddings WHERE task_id = $1", task_id)
        == 0
    )


async def test_nearest_neighbours_use_the_models_hnsw_index(task_db: asyncpg.Connection) -> None:
    rng = np.random.default_rng(11)
    vectors = {}
    for i in range(60):
        task_id = await new_task(task_db, f"Neighbour {i}")
        vectors[task_id] = unit(rng)
        await store(task_db, task_id, vectors[task_id], MODEL)
    target = next(iter(vectors))
    query = (
        "SELECT task_id FROM task_embeddings WHERE model = '" + MODEL + "'"
        " ORDER BY embedding::vector(384) <=> $1::vector(384) LIMIT 5"
    )
    async with task_db.transaction():
        await task_db.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            r[0] for r in await task_db.fetch("EXPLAIN " + query, literal(vectors[target]))
        )
    assert "task_embeddings_hnsw_all_minilm_l6_v2" in plan
    nearest = [r["task_id"] for r in await task_db.fetch(query, literal(vectors[target]))]
    assert nearest[0] == target
