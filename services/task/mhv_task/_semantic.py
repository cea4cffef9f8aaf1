"""Semantic and hybrid search: whether the server offers it, the query's embedding, fusion.

Semantic search needs the pgvector migrations (`migrations/task/0003`, `0004`); a server
without pgvector holds them back, and `SemanticSearch.start` finds the embeddings table
missing: searches in semantic or hybrid mode are then refused with MHV-118 and an unspecified
mode means keyword. The local model is loaded only where semantic search is available.

Search in semantic and hybrid mode ranks a bounded number of candidates (`DEPTH` from each
list) and pages through the fused list by offset:

- **semantic**: the nearest neighbours of the query's embedding among vectors of the model
  that embedded it (a query never compares vectors of two models), fused with the keyword
  matches of tasks semantic search cannot see yet (not embedded, or changed since);
- **hybrid**: the keyword and semantic lists fused.

Fusion is reciprocal rank fusion (each list adds 1 / (k + rank), k = 60), which needs no
calibration between ts_rank_cd and cosine similarity. On the evaluation set it keeps the
semantic list's recall while adding exact keyword matches (docs/search/semantic-search.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mhv_common import paging
from mhv_common.context import time_left
from mhv_common.db import Database
from mhv_common.errors import (
    DeadlineExceededError,
    MahavishnuError,
    QueryEmbeddingFailedError,
    SemanticSearchUnavailableError,
)
from mhv_task import _metrics as metrics
from mhv_task import _store as store
from mhv_task import _store_embeddings as vectors
from mhv_task._embedding import (
    EmbeddingError,
    Embeddings,
    EmbeddingSettings,
    EmbeddingTimeout,
    FallbackEmbedder,
    build_embedder,
)
from mhv_task._models import FTSSearchQuery, SearchHit, SearchMode, SearchPage, Task

logger = logging.getLogger(__name__)

# Candidates taken from each list and fused: how deep semantic and hybrid results page.
DEPTH = 200
RRF_K = 60


@dataclass
class _Fused:
    task: Task
    score: float = 0.0
    rank: float = 0.0
    similarity: float = 0.0
    matched: list[SearchMode] = field(default_factory=list)


def fuse(
    keyword: Sequence[tuple[Task, float]], semantic: Sequence[tuple[Task, float]]
) -> list[SearchHit]:
    """Reciprocal rank fusion of a keyword list (task, rank) and a semantic one (task, cosine).

    Ties are broken by the newer task first, as keyword search does.
    """
    fused: dict[int, _Fused] = {}
    for position, (task, rank) in enumerate(keyword, start=1):
        hit = fused.setdefault(task.id, _Fused(task))
        hit.score += 1.0 / (RRF_K + position)
        hit.rank = rank
        hit.matched.append(SearchMode.KEYWORD)
    for position, (task, similarity) in enumerate(semantic, start=1):
        hit = fused.setdefault(task.id, _Fused(task))
        hit.score += 1.0 / (RRF_K + position)
        hit.similarity = similarity
        hit.matched.append(SearchMode.SEMANTIC)
    ordered = sorted(fused.values(), key=lambda h: (-h.score, -h.task.id))
    return [
        SearchHit(h.task, h.rank, score=h.score, similarity=h.similarity, matched=tuple(h.matched))
        for h in ordered
    ]


class SemanticSearch:
    """Semantic search of the task service: availability, embedder, the two fused modes.

    Args:
        db: The task service's pool.
        settings: Where embeddings come from.
    """

    def __init__(self, db: Database, settings: EmbeddingSettings) -> None:
        self._db = db
        self._settings = settings
        self._available = False
        self._loading: asyncio.Task[FallbackEmbedder] | None = None

    @property
    def available(self) -> bool:
        """Whether semantic and hybrid search can run (known after `start`)."""
        return self._available

    async def embedder(self) -> FallbackEmbedder:
        """The provider chain, once loaded (waits for `start`'s load to finish).

        Raises:
            Exception: Loading failed (the model's files missing or unreadable).
        """
        if self._loading is None:
            raise SemanticSearchUnavailableError(
                "Semantic search is not available on this server (no pgvector); search with "
                "mode SEARCH_MODE_KEYWORD."
            )
        # Shielded: a caller giving up (its deadline) must not cancel the load for everyone.
        return await asyncio.shield(self._loading)

    async def start(self) -> None:
        """Find out whether the server offers semantic search; if so, start loading the model.

        The service answers meanwhile (keyword searches at once); the first semantic search
        and the embedding worker wait for the load, a second or two.
        """
        # Every embedding series exists from the start, at zero where nothing is embedded.
        metrics.embedding_series(remote_configured=self._settings.remote_url is not None)
        async with self._db.connection() as conn:
            self._available = await vectors.semantic_search_ready(conn, timeout=10.0)
        if not self._available:
            logger.warning(
                "semantic search unavailable: the database has no pgvector (its migrations "
                "were held back); keyword search only, semantic and hybrid searches answer "
                "MHV-118",
            )
            return
        self._loading = asyncio.create_task(self._load(), name="embedding-model-load")

    async def _load(self) -> FallbackEmbedder:
        started = time.perf_counter()
        try:
            # Reading the model's weights takes a second or two: off the event loop.
            embedder = await asyncio.to_thread(build_embedder, self._settings)
        except Exception:
            logger.exception("the embedding model could not be loaded; semantic search fails")
            raise
        remote = embedder.remote
        logger.info(
            "semantic search available",
            extra={
                "model": embedder.model,
                "dimensions": embedder.dimensions,
                "remote": remote.model if remote is not None else None,
                "local": embedder.local.model,
                "load_s": round(time.perf_counter() - started, 2),
            },
        )
        return embedder

    async def close(self) -> None:
        """Release the providers (after the load, if it is still running)."""
        if self._loading is None:
            return
        try:
            embedder = await self._loading
        except Exception:  # logged by the load; nothing to release
            return
        await embedder.aclose()

    def resolve(self, mode: SearchMode | None) -> SearchMode:
        """The mode a search runs in: unspecified means hybrid where available."""
        if mode is not None:
            return mode
        return SearchMode.HYBRID if self._available else SearchMode.KEYWORD

    async def search(self, request: FTSSearchQuery, mode: SearchMode) -> SearchPage:
        """A page of semantic or hybrid results.

        Raises:
            SemanticSearchUnavailableError: The server has no pgvector (MHV-118).
            QueryEmbeddingFailedError: No provider could embed the query (MHV-119).
            DeadlineExceededError: The deadline passed while embedding (MHV-007).
        """
        if not self._available:
            raise SemanticSearchUnavailableError(
                "Semantic search is not available on this server (no pgvector); search with "
                "mode SEARCH_MODE_KEYWORD."
            )
        filters = request.filters()
        size = paging.page_size(request.page_size)
        # The model joins the scope: a token from before a model switch starts over.
        scope = {**filters, "query": request.query, "mode": mode.value}
        position = paging.decode_token(request.page_token, filters=scope, fields={"offset": int})
        offset = int(position["offset"]) if position else 0
        if offset < 0:
            raise paging.not_ours()
        query = await self.embed_query(request.query)
        vector, model = query.vectors[0], query.model
        async with self._db.connection() as conn:
            nearest = await vectors.search_semantic(
                conn,
                vector=vector,
                model=model,
                filters=filters,
                limit=DEPTH,
                timeout=time_left(),
            )
            keyword = await store.search_tasks(
                conn,
                query=request.query,
                filters=filters,
                after=None,
                limit=DEPTH,
                timeout=time_left(),
                not_embedded_by=model if mode is SearchMode.SEMANTIC else None,
            )
        hits = fuse(keyword, nearest)
        page = hits[offset : offset + size]
        token = ""
        if offset + size < len(hits):
            token = paging.encode_token({"offset": offset + size}, filters=scope)
        return SearchPage(page, token, mode)

    async def embed_query(self, text: str) -> Embeddings:
        """The query's embedding, timed and counted by provider outcome."""
        try:
            embedder = await asyncio.wait_for(self.embedder(), time_left())
        except TimeoutError:
            raise DeadlineExceededError(
                "The deadline passed while the embedding model was loading."
            ) from None
        except MahavishnuError:
            raise
        except Exception:
            raise QueryEmbeddingFailedError(
                "The search query could not be embedded; retry, or search with mode "
                "SEARCH_MODE_KEYWORD."
            ) from None
        started = time.perf_counter()
        try:
            embedded = await embedder.embed([text], timeout=time_left())
        except EmbeddingError as exc:
            metrics.embedded(
                purpose="query", outcome=exc.outcome, seconds=time.perf_counter() - started
            )
            logger.warning("query embedding failed", extra={"error": repr(exc)})
            if isinstance(exc, EmbeddingTimeout):
                raise DeadlineExceededError(
                    "The deadline passed while embedding the search query."
                ) from None
            raise QueryEmbeddingFailedError(
                "The search query could not be embedded; retry, or search with mode "
                "SEARCH_MODE_KEYWORD."
            ) from None
        metrics.embedded(
            purpose="query", outcome=embedded.outcome, seconds=time.perf_counter() - started
        )
        return embedded
