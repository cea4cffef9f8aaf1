"""Semantic search from the command line: whether a database offers it, and ``mhv reindex``.

`semantic_search_status` is what ``mhv validate-config`` prints about semantic search.
"""

from __future__ import annotations

import asyncpg

from mhv_task._embedding import EmbeddingSettings


def provider_chain(settings: EmbeddingSettings) -> str:
    """The embedding providers `settings` describe, in the order they are asked."""
    local = f"local {settings.local_model_name}"
    if settings.remote_url is None:
        return local
    return (
        f"remote {settings.remote_model} ({settings.remote_dimensions} dimensions) at "
        f"{settings.remote_url}, then {local} when it fails"
    )


async def semantic_search_status(task_database_url: str) -> str:
    """One line: whether the task database offers semantic search, and what to do if not."""
    if not task_database_url:
        return "semantic search: not checked (MHV_TASK_DATABASE_URL is not set)"
    try:
        conn = await asyncpg.connect(task_database_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        return (
            f"semantic search: not checked (the task database is unreachable: {type(exc).__name__})"
        )
    try:
        ready = await conn.fetchval("SELECT to_regclass('task_embeddings') IS NOT NULL")
        version = await conn.fetchval(
            "SELECT coalesce((SELECT extversion FROM pg_extension WHERE extname = 'vector'),"
            " (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'))"
        )
    finally:
        await conn.close()
    if ready:
        return f"semantic search: available (pgvector {version})"
    if version is None:
        return (
            "semantic search: unavailable: the PostgreSQL server has no pgvector; semantic and "
            "hybrid searches answer MHV-118, keyword search works (install pgvector, then run "
            "`mhv migrate`)"
        )
    return (
        f"semantic search: unavailable: the server offers pgvector {version} but its "
        "migrations have not run; run `mhv migrate` and restart the task service"
    )
