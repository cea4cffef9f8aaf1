"""The remote embeddings provider: an OpenAI-compatible ``POST <url>/embeddings`` endpoint.

Each HTTP attempt is bounded by its own timeout and by the caller's deadline. Transient failures
(connection errors, timeouts, 408, 429, 5xx) are retried with jittered exponential backoff
(tenacity), honouring ``Retry-After`` when the server sends one, as long as the deadline
allows. A circuit breaker (purgatory) counts failed attempts: after `breaker_failures` in a row
it opens and calls fail at once, without a request, until `breaker_reset_seconds` have passed;
then one call probes the endpoint and closes the circuit again if it succeeds. Requests the
server refuses as invalid (400, 413, 422) are neither retried nor counted: they say nothing
about the endpoint's health.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import OpenedState
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from mhv_task._embedding import (
    EmbeddingRejected,
    Embeddings,
    EmbeddingSettings,
    EmbeddingTimeout,
    EmbeddingUnavailable,
    Vectors,
    unit_rows,
)

logger = logging.getLogger(__name__)

_PROVIDER = "remote"
_CIRCUIT = "embeddings"
_REJECTED_STATUSES = frozenset({400, 413, 422})
_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# Breaker state names, as purgatory reports them.
BreakerState = str


class _Transient(EmbeddingUnavailable):
    """A failure worth another attempt."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(_PROVIDER, reason)
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


class RemoteEmbedder:
    """Embeddings from an OpenAI-compatible HTTP API (`Embedder`)."""

    def __init__(
        self,
        *,
        url: str,
        model: str,
        dimensions: int,
        api_key: str | None = None,
        attempt_timeout: float = 2.0,
        attempts: int = 3,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
        max_batch: int = 64,
        breaker_failures: int = 5,
        breaker_reset_seconds: float = 30.0,
        on_breaker_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/", headers=headers, timeout=attempt_timeout
        )
        self._model = model
        self._dimensions = dimensions
        self._attempt_timeout = attempt_timeout
        self._attempts = attempts
        self._wait = wait_exponential_jitter(
            multiplier=backoff_initial, max=backoff_max, jitter=backoff_initial
        )
        self._max_batch = max_batch
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=breaker_failures,
            default_ttl=breaker_reset_seconds,
            exclude=[EmbeddingRejected],
        )
        self._state: BreakerState = "closed"
        self._on_breaker_change = on_breaker_change
        self._breakers.add_listener(self._breaker_event)

    @classmethod
    def from_settings(cls, settings: EmbeddingSettings) -> RemoteEmbedder:
        """The remote provider `settings` describe (``remote_url`` must be set)."""
        if settings.remote_url is None:
            raise ValueError("no remote embeddings URL configured")
        key = settings.remote_api_key
        return cls(
            url=str(settings.remote_url),
            model=settings.remote_model,
            dimensions=settings.remote_dimensions,
            api_key=key.get_secret_value() if key is not None else None,
            attempt_timeout=settings.remote_timeout_seconds,
            attempts=settings.remote_attempts,
            backoff_initial=settings.remote_backoff_initial_seconds,
            backoff_max=settings.remote_backoff_max_seconds,
            max_batch=settings.remote_max_batch,
            breaker_failures=settings.remote_breaker_failures,
            breaker_reset_seconds=settings.remote_breaker_reset_seconds,
        )

    @property
    def model(self) -> str:
        """The model name sent to the API and stored with the vectors."""
        return self._model

    @property
    def dimensions(self) -> int:
        """The vector length the API must answer with."""
        return self._dimensions

    @property
    def breaker_state(self) -> BreakerState:
        """``closed``, ``opened`` or ``half-opened``."""
        return self._state

    def _breaker_event(self, _circuit: str, event_type: str, event: Any) -> None:
        if event_type != "state_changed":
            return
        self._state = event.state
        logger.warning("remote embeddings circuit %s", event.state)
        if self._on_breaker_change is not None:
            self._on_breaker_change(event.state)

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> Embeddings:
        """Embed `texts` through the API, `max_batch` texts per request.

        Raises:
            EmbeddingUnavailable: Unreachable, erroring, malformed answers, or the circuit is
                open.
            EmbeddingRejected: The API refused the texts as invalid.
            EmbeddingTimeout: The deadline passed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        chunks = [
            await self._embed_chunk(list(texts[i : i + self._max_batch]), deadline)
            for i in range(0, len(texts), self._max_batch)
        ]
        vectors = (
            np.concatenate(chunks) if chunks else np.empty((0, self._dimensions), dtype=np.float32)
        )
        return Embeddings(vectors, self._model, "remote")

    async def _embed_chunk(self, texts: list[str], deadline: float | None) -> Vectors:
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = exc.retry_after if isinstance(exc, _Transient) else None
            pause = max(self._wait(state), after or 0.0)
            if deadline is not None and time.monotonic() + pause >= deadline:
                raise EmbeddingTimeout(_PROVIDER, "deadline passed while backing off") from exc
            return pause

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, _Transient)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(texts, deadline)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _attempt(self, texts: list[str], deadline: float | None) -> Vectors:
        left = self._attempt_timeout
        if deadline is not None:
            left = min(left, deadline - time.monotonic())
            if left <= 0:
                raise EmbeddingTimeout(_PROVIDER, "deadline passed")
        try:
            breaker = await self._breakers.get_breaker(_CIRCUIT)
            async with breaker:
                return await self._post(texts, left)
        except OpenedState as exc:
            raise EmbeddingUnavailable(_PROVIDER, "circuit open after repeated failures") from exc

    async def _post(self, texts: list[str], timeout: float) -> Vectors:
        body = {"model": self._model, "input": texts, "encoding_format": "float"}
        try:
            response = await self._client.post("embeddings", json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            logger.warning("remote embeddings: no answer within %.2fs", timeout)
            raise _Transient("timed out") from exc
        except httpx.TransportError as exc:
            logger.warning("remote embeddings: %s", type(exc).__name__)
            raise _Transient("unreachable") from exc
        if response.status_code in _REJECTED_STATUSES:
            raise EmbeddingRejected(_PROVIDER, f"HTTP {response.status_code}")
        if response.status_code in _TRANSIENT_STATUSES:
            logger.warning("remote embeddings: HTTP %d", response.status_code)
            raise _Transient(f"HTTP {response.status_code}", retry_after=_retry_after(response))
        if response.status_code != 200:
            logger.warning("remote embeddings: HTTP %d", response.status_code)
            raise EmbeddingUnavailable(_PROVIDER, f"HTTP {response.status_code}")
        return self._vectors(response, len(texts))

    def _vectors(self, response: httpx.Response, expected: int) -> Vectors:
        """The answer's vectors in input order, checked and scaled to unit length."""
        try:
            data = sorted(response.json()["data"], key=lambda item: int(item["index"]))
            vectors = np.asarray([item["embedding"] for item in data], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingUnavailable(_PROVIDER, "malformed answer") from exc
        indexes = [int(item["index"]) for item in data]
        if (
            indexes != list(range(expected))
            or vectors.shape != (expected, self._dimensions)
            or not np.isfinite(vectors).all()
        ):
            raise EmbeddingUnavailable(
                _PROVIDER,
                f"answer does not fit the request ({len(data)} vectors for {expected} texts, "
                f"expected {self._dimensions} dimensions)",
            )
        return unit_rows(vectors)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()
