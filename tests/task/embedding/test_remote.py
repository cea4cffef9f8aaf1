"""The remote provider against a local stand-in for an OpenAI-compatible embeddings API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from mhv_task._embedding import EmbeddingRejected, EmbeddingTimeout, EmbeddingUnavailable
from mhv_task._embedding_local import LocalEmbedder
from mhv_task._embedding_remote import RemoteEmbedder
from tests.task.embedding.stub import RemoteEmbeddingsStub

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
async def make_remote(
    stub: RemoteEmbeddingsStub,
) -> AsyncIterator[Callable[..., RemoteEmbedder]]:
    made: list[RemoteEmbedder] = []

    def make(**options: object) -> RemoteEmbedder:
        settings: dict[str, object] = {
            "url": stub.url,
            "model": MODEL,
            "dimensions": 384,
            "api_key": "sk-test-key",
            "attempt_timeout": 10.0,
            "attempts": 3,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
            "breaker_failures": 5,
            "breaker_reset_seconds": 30.0,
        }
        settings.update(options)
        remote = RemoteEmbedder(**settings)  # type: ignore[arg-type]
        made.append(remote)
        return remote

    yield make
    for remote in made:
        await remote.aclose()


async def test_embeds_in_input_order_with_the_key(
    stub: RemoteEmbeddingsStub,
    make_remote: Callable[..., RemoteEmbedder],
    local_embedder: LocalEmbedder,
) -> None:
    stub.behaviour.shuffle = True
    texts = ["Fix the flaky test", "Rotate the database password", "Dark mode for docs"]
    result = await make_remote(max_batch=2).embed(texts)
    assert result.outcome == "remote"
    assert result.model == MODEL
    expected = (await local_embedder.embed(texts)).vectors
    assert np.allclose(result.vectors, expected, atol=1e-5)
    # Two requests of at most two texts, each naming the model and carrying the key.
    assert [r["input"] for r in stub.requests] == [texts[:2], texts[2:]]
    assert {r["model"] for r in stub.requests} == {MODEL}
    assert {h["authorization"] for h in stub.headers} == {"Bearer sk-test-key"}


async def test_no_texts_no_request(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    result = await make_remote().embed([])
    assert result.vectors.shape == (0, 384)
    assert stub.requests == []


async def test_transient_failures_are_retried(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    stub.behaviour.failures = 2
    stub.behaviour.status = 503
    result = await make_remote().embed(["retry me"])
    assert result.vectors.shape == (1, 384)
    assert len(stub.requests) == 3


async def test_retries_stop_after_the_configured_attempts(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    stub.behaviour.failures = 10
    stub.behaviour.status = 502
    with pytest.raises(EmbeddingUnavailable, match="HTTP 502"):
        await make_remote(attempts=3).embed(["still failing"])
    assert len(stub.requests) == 3


async def test_invalid_input_is_not_retried(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    stub.behaviour.failures = 1
    stub.behaviour.status = 400
    with pytest.raises(EmbeddingRejected):
        await make_remote().embed(["too long, says the server"])
    assert len(stub.requests) == 1


async def test_a_slow_endpoint_times_out_each_attempt(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    stub.behaviour.delay = 0.8
    with pytest.raises(EmbeddingUnavailable, match="timed out"):
        await make_remote(attempt_timeout=0.2, attempts=2).embed(["slow"])
    assert len(stub.requests) == 2


async def test_the_callers_deadline_bounds_the_retries(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    # A Retry-After longer than the time left ends the call instead of sleeping past it.
    stub.behaviour.failures = 5
    stub.behaviour.status = 429
    stub.behaviour.retry_after = "30"
    with pytest.raises(EmbeddingTimeout):
        await make_remote(attempts=5).embed(["busy"], timeout=5.0)
    assert len(stub.requests) == 1


async def test_an_answer_that_does_not_fit_is_refused(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    stub.behaviour.dimensions = 100
    with pytest.raises(EmbeddingUnavailable, match="expected 384 dimensions"):
        await make_remote().embed(["wrong model behind the URL"])


async def test_an_unreachable_endpoint_is_unavailable(
    make_remote: Callable[..., RemoteEmbedder],
) -> None:
    remote = make_remote(url="http://127.0.0.1:9/v1", attempts=2)
    with pytest.raises(EmbeddingUnavailable, match="unreachable"):
        await remote.embed(["nobody listens on the discard port"])


async def test_breaker_opens_after_repeated_failures_and_closes_after_a_probe(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    changes: list[str] = []
    remote = make_remote(
        attempts=1,
        breaker_failures=2,
        breaker_reset_seconds=0.5,
        on_breaker_change=changes.append,
    )
    stub.behaviour.failures = 100
    for _ in range(2):
        with pytest.raises(EmbeddingUnavailable, match="HTTP 503"):
            await remote.embed(["failing"])
    assert remote.breaker_state == "opened"
    # Open: calls fail at once, without a request.
    with pytest.raises(EmbeddingUnavailable, match="circuit open"):
        await remote.embed(["refused locally"])
    assert len(stub.requests) == 2
    # The endpoint heals; after the reset time one call probes it and closes the circuit.
    stub.behaviour.failures = 0
    await asyncio.sleep(0.6)
    assert (await remote.embed(["probe"])).outcome == "remote"
    assert remote.breaker_state == "closed"
    assert changes == ["opened", "half-opened", "closed"]
    assert len(stub.requests) == 3


async def test_a_failed_probe_opens_the_circuit_again(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    remote = make_remote(attempts=1, breaker_failures=1, breaker_reset_seconds=0.3)
    stub.behaviour.failures = 100
    with pytest.raises(EmbeddingUnavailable):
        await remote.embed(["first failure opens"])
    await asyncio.sleep(0.4)
    with pytest.raises(EmbeddingUnavailable, match="HTTP 503"):
        await remote.embed(["probe fails"])
    assert remote.breaker_state == "opened"
    with pytest.raises(EmbeddingUnavailable, match="circuit open"):
        await remote.embed(["refused locally again"])
    assert len(stub.requests) == 2


async def test_rejected_inputs_do_not_open_the_circuit(
    stub: RemoteEmbeddingsStub, make_remote: Callable[..., RemoteEmbedder]
) -> None:
    remote = make_remote(breaker_failures=1)
    stub.behaviour.failures = 3
    stub.behaviour.status = 422
    for _ in range(3):
        with pytest.raises(EmbeddingRejected):
            await remote.embed(["bad input"])
    assert remote.breaker_state == "closed"
    assert (await remote.embed(["good input"])).outcome == "remote"
