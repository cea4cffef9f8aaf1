"""Fixtures for the embedding providers (the local model and pgvector: tests/task/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mhv_task._embedding_local import LocalEmbedder
from tests.task.embedding.stub import RemoteEmbeddingsStub, remote_embeddings_stub


@pytest.fixture
async def stub(local_embedder: LocalEmbedder) -> AsyncIterator[RemoteEmbeddingsStub]:
    """A fresh stand-in for the remote embeddings API."""
    async with remote_embeddings_stub(local_embedder) as running:
        yield running
