"""SQL for semantic search: task vectors (pgvector), the embedding backlog, reindexing.

The tables exist only where the pgvector migrations ran (`migrations/task/0003`, `0004`); every
statement here is reached only after `semantic_search_ready` said so. Vectors travel in
pgvector's text form (``[0.1,0.2,...]``): asyncpg has no codec for the type, and a pool-wide
codec would fail on servers without the extension.

A model's HNSW index is partial (``WHERE model = '<name>'``) on the vector cast to the model's
length, so a search names the model as a literal and repeats the cast: a parameter would give
a generic plan that cannot prove the index's predicate. Model names come from configuration,
never from a request, and are quoted as SQL literals all the same.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import numpy as np
from numpy.typing import NDArray

from mhv_task._embedding import LOCAL_MODEL
from mhv_task._models import Task
from mhv_task._store import TASK_COLUMNS, task_from_row

# The text a task is embedded from, the same in Python and SQL (for the content digest).
TEXT_SQL = "convert_to(t.title || E'\\n' || coalesce(t.description, ''), 'UTF8')"

# pgvector's HNSW scan hands back at most hnsw.ef_search candidates, and filters apply after
# it: a filtered search looks at more candidates to still fill its list (1000 is the maximum).
_EF_SEARCH_MIN = 40
_EF_SEARCH_MAX = 1000
_FILTERED_OVERFETCH = 4


def task_text(title: str, description: str | None) -> str:
    """What a task is embedded from: title, newline, description."""
    return f"{title}\n{description or ''}"


def content_digest(text: str) -> bytes:
    """SHA-256 of the embedded text, stored with the vector (`TEXT_SQL` computes the same)."""
    return hashlib.sha256(text.encode()).digest()


def sql_literal(value: str) -> str:
    """`value` as a SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def vector_text(vector: NDArray[np.float32]) -> str:
    """Pgvector's text form of `vector`."""
    return "[" + ",".join(f"{x:.8g}" for x in vector.tolist()) + "]"


def index_name(model: str, dimensions: int) -> str:
    """Name of `model`'s partial HNSW index (the migration's for the packaged model)."""
    if (model, dimensions) == (LOCAL_MODEL, 384):
        return "task_embeddings_hnsw_all_minilm_l6_v2"
    slug = re.sub(r"[^a-z0-9]+", "_", model.rsplit("/", 1)[-1].lower()).strip("_")[:32]
    digest = hashlib.sha256(f"{model}:{dimensions}".encode()).hexdigest()[:8]
    return f"task_embeddings_hnsw_{slug}_{digest}"


async def semantic_search_ready(conn: asyncpg.Connection, *, timeout: float | None) -> bool:
    """True when the pgvector migrations ran (the task role sees ``task_embeddings``)."""
    ready: bool = await conn.fetchval(
        "SELECT to_regclass('task_embeddings') IS NOT NULL", timeout=timeout
    )
    return ready


def semantic_statement(
    *,
    vector: NDArray[np.float32],
    model: str,
    filters: Mapping[str, Any],
    limit: int,
) -> tuple[str, list[Any], int]:
    """The nearest-neighbour statement, its arguments, and the hnsw.ef_search it needs."""
    dims = len(vector)
    args: list[Any] = [vector_text(vector)]
    where = [f"e.model = {sql_literal(model)}"]
    if filters.get("repository") is not None:
        args.append(filters["repository"])
        where.append(f"t.repository = ${len(args)}")
    if filters.get("status") is not None:
        args.append(filters["status"])
        where.append(f"t.status = ${len(args)}::task_status")
    filtered = len(args) > 1
    args.append(limit)
    ef_search = min(
        max(limit * (_FILTERED_OVERFETCH if filtered else 1), _EF_SEARCH_MIN), _EF_SEARCH_MAX
    )
    # The query as text, cast: the same statement whether or not a vector codec is set.
    distance = f"e.embedding::vector({dims}) <=> $1::text::vector({dims})"
    columns = ", ".join(f"t.{c.strip()}" for c in TASK_COLUMNS.split(","))
    sql = f"""
        SELECT {columns}, {distance} AS distance
        FROM task_embeddings e JOIN tasks t ON t.id = e.task_id
        WHERE {" AND ".join(where)}
        ORDER BY {distance}
        LIMIT ${len(args)}
        """  # nosec B608: constant columns, a dimension count; values are bound
    return sql, args, int(ef_search)


async def search_semantic(
    conn: asyncpg.Connection,
    *,
    vector: NDArray[np.float32],
    model: str,
    filters: Mapping[str, Any],
    limit: int,
    timeout: float | None,
) -> list[tuple[Task, float]]:
    """The `limit` tasks nearest to `vector` among `model`'s vectors, and cosine similarity."""
    sql, args, ef_search = semantic_statement(
        vector=vector, model=model, filters=filters, limit=limit
    )
    async with conn.transaction():
        await conn.execute(f"SET LOCAL hnsw.ef_search = {ef_search}", timeout=timeout)
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=timeout)
    return [(task_from_row(row), 1.0 - float(row["distance"])) for row in rows]


async def claim_backlog(
    conn: asyncpg.Connection, *, limit: int, lease_seconds: float, timeout: float | None
) -> list[tuple[int, int, str]]:
    """Claim up to `limit` waiting tasks for `lease_seconds`: (task id, generation, text).

    Rows another worker holds (locked now, or under an unexpired lease) are skipped, never
    waited for. The lease outlives this statement: the embedding runs outside any
    transaction, and a worker that dies leaves rows that are claimable again once it expires.
    """
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        UPDATE embedding_backlog b
        SET claimed_until = now() + make_interval(secs => $2)
        FROM tasks t
        WHERE t.id = b.task_id AND b.task_id IN (
            SELECT task_id FROM embedding_backlog
            WHERE claimed_until IS NULL OR claimed_until < now()
            ORDER BY enqueued_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED)
        RETURNING b.task_id, b.generation, t.title, t.description
        """,
        limit,
        lease_seconds,
        timeout=timeout,
    )
    return [
        (row["task_id"], row["generation"], task_text(row["title"], row["description"]))
        for row in rows
    ]


async def store_vectors(
    conn: asyncpg.Connection,
    *,
    task_ids: Sequence[int],
    texts: Sequence[str],
    vectors: NDArray[np.float32],
    model: str,
    timeout: float | None,
) -> int:
    """Insert or replace `model`'s vectors of these tasks; returns how many were stored.

    Tasks deleted meanwhile are skipped (their rows are locked KEY SHARE first, so a delete
    running now either finished before, and the task is skipped, or waits for this commit).
    """
    stored: int = await conn.fetchval(
        """
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[])
                AS i(task_id, embedding, content_sha256)
        ), live AS (
            SELECT i.* FROM input i JOIN tasks t ON t.id = i.task_id FOR KEY SHARE OF t
        ), upserted AS (
            INSERT INTO task_embeddings (task_id, model, dimensions, embedding, content_sha256)
            SELECT task_id, $4, $5, embedding::vector, content_sha256 FROM live
            ON CONFLICT (task_id, model) DO UPDATE
                SET dimensions = EXCLUDED.dimensions, embedding = EXCLUDED.embedding,
                    content_sha256 = EXCLUDED.content_sha256, embedded_at = now()
            RETURNING 1
        )
        SELECT count(*) FROM upserted
        """,
        list(task_ids),
        [vector_text(v) for v in vectors],
        [content_digest(text) for text in texts],
        model,
        int(vectors.shape[1]),
        timeout=timeout,
    )
    return stored


async def finish_backlog(
    conn: asyncpg.Connection,
    *,
    claimed: Sequence[tuple[int, int]],
    timeout: float | None,
) -> None:
    """Remove the claimed (task id, generation) rows whose generation is unchanged.

    A task edited since it was claimed has a newer generation: its row stays, unclaimed, and
    the task is embedded again.
    """
    await conn.execute(
        """
        DELETE FROM embedding_backlog b
        USING unnest($1::bigint[], $2::bigint[]) AS c(task_id, generation)
        WHERE b.task_id = c.task_id AND b.generation = c.generation
        """,
        [task_id for task_id, _ in claimed],
        [generation for _, generation in claimed],
        timeout=timeout,
    )


async def store_claimed(
    conn: asyncpg.Connection,
    *,
    claimed: Sequence[tuple[int, int, str]],
    vectors: NDArray[np.float32],
    model: str,
    timeout: float | None,
) -> int:
    """One transaction: the vectors of claimed (task id, generation, text) rows, then the rows.

    Returns how many vectors were stored.
    """
    async with conn.transaction():
        stored = await store_vectors(
            conn,
            task_ids=[task_id for task_id, _, _ in claimed],
            texts=[text for _, _, text in claimed],
            vectors=vectors,
            model=model,
            timeout=timeout,
        )
        await finish_backlog(
            conn,
            claimed=[(task_id, generation) for task_id, generation, _ in claimed],
            timeout=timeout,
        )
    return stored


async def backlog_state(conn: asyncpg.Connection, *, timeout: float | None) -> tuple[int, float]:
    """Tasks waiting to be embedded, and the seconds the oldest has waited (0 when none)."""
    row = await conn.fetchrow(
        "SELECT count(*) AS depth,"
        " coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)::float8 AS age"
        " FROM embedding_backlog",
        timeout=timeout,
    )
    assert row is not None
    return int(row["depth"]), float(row["age"])


_MISSING = f"""
FROM tasks t
LEFT JOIN task_embeddings e ON e.task_id = t.id AND e.model = $1
WHERE (e.task_id IS NULL OR e.content_sha256 <> sha256({TEXT_SQL}))
"""


async def count_missing_vectors(
    conn: asyncpg.Connection, *, model: str, timeout: float | None
) -> int:
    """Tasks with no vector of `model` for their current text."""
    count: int = await conn.fetchval(f"SELECT count(*) {_MISSING}", model, timeout=timeout)
    return count


async def tasks_missing_vectors(
    conn: asyncpg.Connection, *, model: str, after_id: int, limit: int, timeout: float | None
) -> list[tuple[int, str]]:
    """The next `limit` tasks by id above `after_id` with no current vector of `model`."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT t.id, t.title, t.description {_MISSING} AND t.id > $2 ORDER BY t.id LIMIT $3",
        model,
        after_id,
        limit,
        timeout=timeout,
    )
    return [(row["id"], task_text(row["title"], row["description"])) for row in rows]


async def ensure_model_index(
    conn: asyncpg.Connection, *, model: str, dimensions: int, timeout: float | None
) -> str:
    """Create `model`'s partial HNSW index unless it exists (concurrently: writes go on).

    An interrupted concurrent build leaves an invalid index behind; it is dropped and built
    again.
    """
    name = index_name(model, dimensions)
    valid = await conn.fetchval(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        name,
        timeout=timeout,
    )
    if valid is False:
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}", timeout=timeout)
    await conn.execute(
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON task_embeddings"
        f" USING hnsw ((embedding::vector({int(dimensions)})) vector_cosine_ops)"
        f" WHERE model = {sql_literal(model)}",
        timeout=timeout,
    )
    return name


async def vector_counts(
    conn: asyncpg.Connection, *, timeout: float | None
) -> list[tuple[str, int, int]]:
    """(model, dimensions, vectors) for every model with stored vectors."""
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT model, dimensions, count(*) AS n FROM task_embeddings"
        " GROUP BY model, dimensions ORDER BY model",
        timeout=timeout,
    )
    return [(row["model"], row["dimensions"], row["n"]) for row in rows]


async def drop_model(
    conn: asyncpg.Connection, *, model: str, dimensions: int, timeout: float | None
) -> int:
    """Delete `model`'s vectors and drop its index; returns the vectors deleted."""
    status: str = await conn.execute(
        "DELETE FROM task_embeddings WHERE model = $1", model, timeout=timeout
    )
    await conn.execute(
        f"DROP INDEX CONCURRENTLY IF EXISTS {index_name(model, dimensions)}", timeout=timeout
    )
    return int(status.rsplit(" ", 1)[-1])
