"""The embedding worker: embeds tasks after their commit, so embedding never slows a write.

Triggers on ``tasks`` (migrations/task/0004) put a task in ``embedding_backlog`` in the very
transaction that creates it or changes its title or description. Each round of the worker
claims the oldest waiting rows with ``FOR UPDATE SKIP LOCKED`` under a lease (other processes
and replicas skip them), embeds their texts outside any transaction through the provider chain
(remote, else the local model), then in one transaction stores the vectors under the model
that made them and removes the rows whose generation did not move meanwhile: a task edited
while it was being embedded stays in the backlog and is embedded again. A process that dies
mid-round leaves its rows to be claimed again when the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from mhv_common import context
from mhv_common.db import Database
from mhv_common.periodic import Periodic
from mhv_task import _metrics as metrics
from mhv_task import _store_embeddings as vectors
from mhv_task._embedding import EmbeddingError
from mhv_task._semantic import SemanticSearch

logger = logging.getLogger(__name__)

_MAX_BACKOFF_SECONDS = 30.0


class EmbeddingWorker:
    """Background worker embedding the tasks of the embedding backlog.

    Args:
        db: The task service's pool.
        semantic: Semantic search; the worker idles where it is unavailable.
        batch_size: Most tasks per round.
        lease_seconds: How long a claim holds against other workers.
        poll_interval: Pause after a round that found fewer than `batch_size` tasks.
    """

    name = "embedding-worker"

    def __init__(
        self,
        db: Database,
        semantic: SemanticSearch,
        *,
        batch_size: int = 32,
        lease_seconds: float = 120.0,
        poll_interval: float = 1.0,
    ) -> None:
        self._db = db
        self._semantic = semantic
        self._batch = batch_size
        self._lease = lease_seconds
        self._poll = poll_interval
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Finish the current round and return."""
        self._stop.set()

    async def run(self) -> None:
        """Embed until stopped (idle where semantic search is unavailable)."""
        if not self._semantic.available:
            await self._stop.wait()
            return
        backoff = 0.0
        while not self._stop.is_set():
            try:
                done = await self.embed_once()
            except Exception as exc:  # any failure is retried; the lease frees the rows
                backoff = min(max(backoff * 2, 0.5), _MAX_BACKOFF_SECONDS)
                logger.warning(
                    "embedding round failed; retrying",
                    extra={"error": repr(exc), "retry_in_s": round(backoff, 2)},
                )
                await self._pause(backoff * random.uniform(0.5, 1.0))  # noqa: S311
                continue
            backoff = 0.0
            if done < self._batch:
                await self._pause(self._poll)

    async def embed_once(self) -> int:
        """Claim, embed and store one batch; returns how many tasks were claimed."""
        embedder = await self._semantic.embedder()
        with context.deadline_scope(self._lease):
            async with self._db.connection() as conn:
                claimed = await vectors.claim_backlog(
                    conn,
                    limit=self._batch,
                    lease_seconds=self._lease,
                    timeout=context.time_left(),
                )
            if not claimed:
                return 0
            texts = [text for _, _, text in claimed]
            started = time.perf_counter()
            try:
                embedded = await embedder.embed(texts, timeout=context.time_left(cap=self._lease))
            except EmbeddingError as exc:
                metrics.embedded(
                    purpose="index", outcome=exc.outcome, seconds=time.perf_counter() - started
                )
                raise
            metrics.embedded(
                purpose="index", outcome=embedded.outcome, seconds=time.perf_counter() - started
            )
            async with self._db.connection() as conn:
                stored = await vectors.store_claimed(
                    conn,
                    claimed=claimed,
                    vectors=embedded.vectors,
                    model=embedded.model,
                    timeout=context.time_left(),
                )
        metrics.tasks_embedded(stored)
        return len(claimed)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)


class EmbeddingMonitor(Periodic):
    """Refreshes the embedding backlog gauges (where semantic search is available)."""

    name = "embedding-monitor"

    def __init__(self, db: Database, semantic: SemanticSearch, *, interval: float = 5.0) -> None:
        super().__init__(interval=interval, deadline=10.0)
        self._db = db
        self._semantic = semantic

    async def tick(self) -> None:
        """Observe the backlog once."""
        if not self._semantic.available:
            return
        async with self._db.connection() as conn:
            metrics.embedding_backlog(
                *await vectors.backlog_state(conn, timeout=context.time_left())
            )
