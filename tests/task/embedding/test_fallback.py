"""The fallback chain: remote while configured and healthy, else the local model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
from pydantic import ValidationError

from mhv_task._embedding import (
    EmbeddingError,
    EmbeddingSettings,
    FallbackEmbedder,
    build_embedder,
)
from mhv_task._embedding_local import LocalEmbedder
from mhv_task._embedding_remote import RemoteEmbedder
from tests.task.embedding.stub import RemoteEmbeddingsStub

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["Fix authentication failure in WebKit browsers", "login page crashes on Safari"]


@pytest.fixture
async def remote(stub: RemoteEmbeddingsStub) -> AsyncIterator[RemoteEmbedder]:
    made = RemoteEmbedder(
        url=stub.url,
        model=MODEL,
        dimensions=384,
        attempt_timeout=10.0,
        attempts=2,
        backoff_initial=0.01,
        backoff_max=0.02,
        breaker_failures=2,
        breaker_reset_seconds=60.0,
    )
    yield made
    await made.aclose()


def chain(local: LocalEmbedder, remote: RemoteEmbedder | None) -> FallbackEmbedder:
    return FallbackEmbedder(local=local, remote=remote, fallback_reserve_seconds=0.5)


async def test_healthy_remote_answers(
    local_embedder: LocalEmbedder, remote: RemoteEmbedder, stub: RemoteEmbeddingsStub
) -> None:
    result = await chain(local_embedder, remote).embed(TEXTS, timeout=20)
    assert result.outcome == "remote"
    assert len(stub.requests) == 1


async def test_failing_remote_falls_back_to_the_local_model(
    local_embedder: LocalEmbedder, remote: RemoteEmbedder, stub: RemoteEmbeddingsStub
) -> None:
    stub.behaviour.failures = 100
    result = await chain(local_embedder, remote).embed(TEXTS, timeout=20)
    assert result.outcome == "local_fallback"
    assert result.model == MODEL
    local = (await local_embedder.embed(TEXTS)).vectors
    assert np.allclose(result.vectors, local)
    assert len(stub.requests) == 2  # the remote provider's own attempts, then the fallback


async def test_slow_remote_falls_back_within_the_deadline(
    local_embedder: LocalEmbedder, stub: RemoteEmbeddingsStub
) -> None:
    stub.behaviour.delay = 3.0
    slow = RemoteEmbedder(url=stub.url, model=MODEL, dimensions=384, attempt_timeout=30.0)
    try:
        # The remote provider gets the deadline minus the reserve kept for the local model.
        result = await chain(local_embedder, slow).embed(TEXTS, timeout=1.5)
    finally:
        await slow.aclose()
    assert result.outcome == "local_fallback"
    assert len(stub.requests) == 1


async def test_open_circuit_skips_the_remote(
    local_embedder: LocalEmbedder, remote: RemoteEmbedder, stub: RemoteEmbeddingsStub
) -> None:
    stub.behaviour.failures = 100
    fallback = chain(local_embedder, remote)
    await fallback.embed(TEXTS, timeout=20)  # two failed attempts open the circuit
    assert remote.breaker_state == "opened"
    result = await fallback.embed(TEXTS, timeout=20)
    assert result.outcome == "local_fallback"
    assert len(stub.requests) == 2  # no request while the circuit is open


async def test_without_a_remote_the_local_model_answers(local_embedder: LocalEmbedder) -> None:
    fallback = chain(local_embedder, None)
    assert fallback.model == MODEL
    assert fallback.dimensions == 384
    assert (await fallback.embed(TEXTS)).outcome == "local_fallback"


async def test_error_when_no_provider_can_answer_in_time(
    local_embedder: LocalEmbedder, remote: RemoteEmbedder, stub: RemoteEmbeddingsStub
) -> None:
    stub.behaviour.failures = 100
    # 0.5 s kept for the local model and none left: the remote is skipped, the local model
    # finds its deadline passed.
    with pytest.raises(EmbeddingError) as caught:
        await chain(local_embedder, remote).embed(TEXTS, timeout=0.0)
    assert caught.value.outcome == "error"
    assert stub.requests == []


async def test_settings_build_the_chain(
    monkeypatch: pytest.MonkeyPatch, stub: RemoteEmbeddingsStub
) -> None:
    monkeypatch.setenv("MHV_EMBEDDING_REMOTE_URL", stub.url)
    monkeypatch.setenv("MHV_EMBEDDING_REMOTE_MODEL", MODEL)
    monkeypatch.setenv("MHV_EMBEDDING_REMOTE_API_KEY", "sk-from-env")
    monkeypatch.setenv("MHV_EMBEDDING_REMOTE_TIMEOUT_SECONDS", "10")
    settings = EmbeddingSettings()
    assert "sk-from-env" not in repr(settings)
    built = build_embedder(settings)
    try:
        assert isinstance(built.remote, RemoteEmbedder)
        assert (await built.embed(TEXTS, timeout=20)).outcome == "remote"
        assert stub.headers[0]["authorization"] == "Bearer sk-from-env"
    finally:
        await built.aclose()


def test_a_remote_url_needs_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MHV_EMBEDDING_REMOTE_URL", "https://embeddings.example/v1")
    with pytest.raises(ValidationError, match="REMOTE_MODEL is not"):
        EmbeddingSettings()
