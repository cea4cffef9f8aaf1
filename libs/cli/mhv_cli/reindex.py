"""Semantic search from the command line: whether a database offers it, and ``mhv reindex``.

`semantic_search_status` is what ``mhv validate-config`` prints about semantic search.

``mhv reindex`` embeds every task that lacks a vector of the configured model for its current
text: a backfill (tasks from before semantic search was enabled, or a backlog too large for
the service's worker), or a model switch:

1. set the new model's ``MHV_EMBEDDING_*`` settings where ``mhv reindex`` runs and run it: it
   creates the model's HNSW index (concurrently), then embeds every task, showing progress;
   interrupted, it goes on where it stopped when run again;
2. give the task service the same settings and restart it: queries are now embedded by the
   new model and compared only with its vectors;
3. run ``mhv reindex --prune``: it embeds the tasks changed meanwhile (the old service's worker
   embedded them with the old model), then deletes the old model's vectors and index.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg

from mhv_common.config import load_settings
from mhv_common.errors import ConfigurationError, SemanticSearchUnavailableError
from mhv_task import _store_embeddings as vectors
from mhv_task._embedding import EmbeddingError, EmbeddingSettings, build_embedder


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


# --- mhv reindex ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """Prints how far a reindex got: a line per `every` seconds and one at the end."""

    total: int
    every: float = 2.0
    out: TextIO = field(default_factory=lambda: sys.stdout)
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def advance(self, count: int) -> None:
        """`count` more tasks embedded."""
        self.done += count
        now = time.monotonic()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            self.out.write(self.line(now) + "\n")
            self.out.flush()

    def line(self, now: float) -> str:
        """``done/total (percent) rate, time left``."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        share = 100.0 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s left" if left != float("inf") else "time left unknown"
        return f"  {self.done}/{self.total} tasks ({share:.1f} %), {rate:.1f} tasks/s, {eta}"


async def reindex(
    dsn: str,
    settings: EmbeddingSettings,
    *,
    batch_size: int = 64,
    prune: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Embed every task lacking a current vector of the configured model; returns how many.

    The model is the one `settings` prefer (the remote one when configured, else the local
    one), asked directly: a reindex never stores vectors of a fallback model. It only does
    what is missing (no vector of the model, or one of an older text), in task id order, so an
    interrupted run loses at most one batch and the next run goes on from there. With `prune`,
    afterwards, vectors of every other model are deleted and their indexes dropped.

    Raises:
        SemanticSearchUnavailableError: The database has no pgvector migrations (MHV-118).
        EmbeddingError: The provider failed (run again to resume).
    """
    embedder = await asyncio.to_thread(build_embedder, settings)
    provider = embedder.remote or embedder.local
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "task"})
    try:
        if not await vectors.semantic_search_ready(conn, timeout=30):
            raise SemanticSearchUnavailableError(
                "The database has no pgvector migrations: there is nothing to reindex."
            )
        model, dims = provider.model, provider.dimensions
        index = await vectors.ensure_model_index(conn, model=model, dimensions=dims, timeout=None)
        total = await vectors.count_missing_vectors(conn, model=model, timeout=None)
        out.write(f"reindex: model {model} ({dims} dimensions, index {index})\n")
        out.write(f"reindex: {total} tasks to embed\n")
        out.flush()
        progress = Progress(total, out=out)
        after = 0
        while True:
            batch = await vectors.tasks_missing_vectors(
                conn, model=model, after_id=after, limit=batch_size, timeout=None
            )
            if not batch:
                break
            texts = [text for _, text in batch]
            embedded = await provider.embed(texts)
            async with conn.transaction():
                await vectors.store_vectors(
                    conn,
                    task_ids=[task_id for task_id, _ in batch],
                    texts=texts,
                    vectors=embedded.vectors,
                    model=embedded.model,
                    timeout=None,
                )
            after = batch[-1][0]
            progress.advance(len(batch))
        out.write(f"reindex: done, {progress.done} tasks embedded with {model}\n")
        if prune:
            for other, other_dims, count in await vectors.vector_counts(conn, timeout=None):
                if (other, other_dims) != (model, dims):
                    await vectors.drop_model(conn, model=other, dimensions=other_dims, timeout=None)
                    out.write(f"reindex: pruned {count} vectors of {other}\n")
        for name, name_dims, count in await vectors.vector_counts(conn, timeout=None):
            out.write(f"reindex: {count} vectors of {name} ({name_dims} dimensions)\n")
        out.flush()
        return progress.done
    finally:
        await conn.close()
        await embedder.aclose()


def add_commands(sub: Any) -> None:
    """Register ``reindex`` on the ``mhv`` subcommand parser."""
    parser = sub.add_parser(
        "reindex",
        help="embed every task for semantic search with the configured model (resumable)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="tasks per embedding call (default 64)"
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="afterwards, delete the vectors and indexes of every other model",
    )
    parser.set_defaults(func=_reindex)


def _reindex(args: argparse.Namespace) -> int:
    from mhv_cli.main import admin_url

    settings = load_settings(EmbeddingSettings)
    if args.batch_size < 1:
        raise ConfigurationError("--batch-size must be at least 1.")
    try:
        asyncio.run(reindex(admin_url(), settings, batch_size=args.batch_size, prune=args.prune))
    except KeyboardInterrupt:
        print("reindex: interrupted; run `mhv reindex` again to go on where it stopped")
        return 130
    except EmbeddingError as exc:
        print(
            f"reindex: the embedding provider failed ({exc.reason}); "
            "run `mhv reindex` again to go on where it stopped",
            file=sys.stderr,
        )
        return 1
    return 0
