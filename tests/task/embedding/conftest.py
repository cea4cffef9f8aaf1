"""Fixtures for the embedding providers: the real local model, loaded once per run."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from mhv_task._embedding_local import LocalEmbedder
from tests.harness import Cluster, Deployment
from tests.task.embedding.stub import RemoteEmbeddingsStub, remote_embeddings_stub


@pytest.fixture(scope="session")
async def local_embedder() -> AsyncIterator[LocalEmbedder]:
    """all-MiniLM-L6-v2 from the installed package (a few seconds to load; shared)."""
    embedder = LocalEmbedder.load()
    yield embedder
    await embedder.aclose()


@pytest.fixture
async def stub(local_embedder: LocalEmbedder) -> AsyncIterator[RemoteEmbeddingsStub]:
    """A fresh stand-in for the remote embeddings API."""
    async with remote_embeddings_stub(local_embedder) as running:
        yield running


@pytest.fixture(scope="session")
async def vector_cluster(cluster: Cluster) -> AsyncIterator[Cluster]:
    """A cluster that offers pgvector: the run's own, else a private one (which ships it)."""
    conn = await asyncpg.connect(cluster.admin_url)
    try:
        offered = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        )
    finally:
        await conn.close()
    if offered:
        yield cluster
        return
    private = await Cluster.start_private()
    try:
        yield private
    finally:
        await private.close()


@pytest.fixture(scope="session")
async def vector_deployment(vector_cluster: Cluster) -> AsyncIterator[Deployment]:
    """A migrated database with pgvector enabled, dropped at the end of the run."""
    created = await Deployment.create(vector_cluster)
    yield created
    await created.drop()
