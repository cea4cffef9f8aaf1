"""The task service's own metrics, in one place (names and buckets: docs/sre/metrics.md).

The gRPC edge records the per-RPC ones around decoding and the domain call, so a request the
models refuse counts like one the domain refuses; the relay and the outbox monitor set the
outbox ones. Nothing else in the service imports `prometheus_client`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import TracebackType

from prometheus_client import Counter, Gauge, Histogram

from mhv_common.db import DATABASE_SIZE_BYTES
from mhv_common.edge import SERVICE_FAULTS
from mhv_common.errors import MahavishnuError
from mhv_task._embedding import OUTCOMES as PROVIDER_OUTCOMES

TASK_CREATION_TOTAL = Counter(
    "task_creation_total", "CreateTask calls by outcome.", ["repository", "status"]
)
TASK_CREATION_DURATION = Histogram(
    "task_creation_duration_seconds",
    "CreateTask latency, from validation to commit.",
    ["repository"],
    buckets=(0.05, 0.1, 0.5, 1.0, 5.0),
)
SEMANTIC_SEARCH_TOTAL = Counter(
    "semantic_search_total",
    "SearchTasks calls in semantic or hybrid mode (the mode asked for, or resolved from an "
    "unspecified one), by outcome.",
    ["status"],
)
EMBEDDING_DURATION = Histogram(
    "task_embedding_duration_seconds",
    "Time to embed texts: a search query, or a batch of tasks by the embedding worker.",
    ["purpose"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
EMBEDDING_REQUESTS = Counter(
    "task_embedding_requests_total",
    "Embedding calls by purpose and by provider outcome: remote (the remote provider "
    "answered), local_fallback (the local model answered: no remote configured, or it "
    "failed), error (no provider could).",
    ["purpose", "outcome"],
)
EMBEDDING_REMOTE_CONFIGURED = Gauge(
    "task_embedding_remote_configured",
    "1 when a remote embeddings provider is configured (local_fallback then means it failed).",
    multiprocess_mode="livemax",
)
EMBEDDING_BACKLOG = Gauge(
    "task_embedding_backlog",
    "Tasks whose title or description changed since they were last embedded.",
    multiprocess_mode="livemostrecent",
)
EMBEDDING_BACKLOG_AGE = Gauge(
    "task_embedding_backlog_age_seconds",
    "Time the oldest task in the embedding backlog has waited (0 when none).",
    multiprocess_mode="livemostrecent",
)
EMBEDDED_TASKS = Counter("task_embedded_total", "Tasks the embedding worker embedded and stored.")
# Every process of the service samples the same outbox: the newest sample stands.
OUTBOX_DEPTH = Gauge(
    "task_outbox_depth",
    "Audit events committed but not yet delivered.",
    multiprocess_mode="livemostrecent",
)
OUTBOX_LAG = Gauge(
    "task_outbox_lag_seconds",
    "Age of the oldest undelivered audit event (0 when none).",
    multiprocess_mode="livemostrecent",
)
OUTBOX_DELIVERED = Counter("task_outbox_delivered_total", "Audit events delivered.")
OUTBOX_FAILURES = Counter(
    "task_outbox_delivery_failures_total", "Relay rounds that failed and will be retried."
)

TASK_SCHEMA = "task"
UNKNOWN_REPOSITORY_LABEL = "_unknown"
OUTCOMES = ("success", "rejected", "error")
SEMANTIC_MODES = frozenset({"semantic", "hybrid"})
EMBEDDING_PURPOSES = ("query", "index")


def outcome(exc: BaseException | None) -> str:
    """``success``, ``rejected`` (the caller's fault) or ``error`` (ours), for metrics."""
    if exc is None:
        return "success"
    if isinstance(exc, MahavishnuError) and exc.grpc_status not in SERVICE_FAULTS:
        return "rejected"
    return "error"


class _Observed:
    """Records the outcome of the enclosed work (a context manager, cheaper than a generator)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._record(outcome(exc))

    def _record(self, result: str) -> None:
        raise NotImplementedError


# One repository's series: the count by outcome, and the duration.
_CreationSeries = tuple[dict[str, Counter], Histogram]


class _Creation(_Observed):
    """Counts and times one CreateTask call."""

    __slots__ = ("_series", "_started")

    def __init__(self, series: _CreationSeries) -> None:
        self._series = series
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def _record(self, result: str) -> None:
        totals, duration = self._series
        totals[result].inc()
        duration.observe(time.perf_counter() - self._started)


class _Search(_Observed):
    """Counts one semantic or hybrid SearchTasks call by outcome (keyword ones are not)."""

    __slots__ = ("_counted",)

    def __init__(self, counted: bool) -> None:
        self._counted = counted

    def _record(self, result: str) -> None:
        if self._counted:
            SEMANTIC_SEARCH_TOTAL.labels(result).inc()


class RequestMetrics:
    """The per-RPC metrics, with every known label combination at zero from the start.

    Args:
        repositories: The configured repository names. Any other name a caller sends is
            counted as ``_unknown``, so callers cannot blow up the label set.
    """

    def __init__(self, repositories: Iterable[str]) -> None:
        # Each label set's series, looked up here once rather than on every call.
        self._creation: dict[str, _CreationSeries] = {
            repository: (
                {status: TASK_CREATION_TOTAL.labels(repository, status) for status in OUTCOMES},
                TASK_CREATION_DURATION.labels(repository),
            )
            for repository in [*repositories, UNKNOWN_REPOSITORY_LABEL]
        }
        self._unknown = self._creation[UNKNOWN_REPOSITORY_LABEL]
        for status in OUTCOMES:
            SEMANTIC_SEARCH_TOTAL.labels(status)

    def creation(self, repository: str) -> _Creation:
        """Count and time the enclosed CreateTask work under the repository's label."""
        return _Creation(self._creation.get(repository, self._unknown))

    def search(self, mode: str | None) -> _Search:
        """Count the enclosed SearchTasks work by outcome, when `mode` is semantic or hybrid."""
        return _Search(mode in SEMANTIC_MODES)


def outbox_backlog(depth: int, lag_seconds: float) -> None:
    """Record the undelivered events and the age of the oldest."""
    OUTBOX_DEPTH.set(depth)
    OUTBOX_LAG.set(lag_seconds)


def outbox_delivered(count: int) -> None:
    """Count events the relay delivered."""
    OUTBOX_DELIVERED.inc(count)


def outbox_round_failed() -> None:
    """Count a relay round that failed and will be retried."""
    OUTBOX_FAILURES.inc()


def schema_size(size: int) -> None:
    """Record the bytes the task schema uses on disk."""
    DATABASE_SIZE_BYTES.labels(schema=TASK_SCHEMA).set(size)


def embedding_series(*, remote_configured: bool) -> None:
    """Every embedding series at zero from the start, and whether a remote one is configured."""
    EMBEDDING_REMOTE_CONFIGURED.set(1 if remote_configured else 0)
    for purpose in EMBEDDING_PURPOSES:
        EMBEDDING_DURATION.labels(purpose)
        for provider_outcome in PROVIDER_OUTCOMES:
            EMBEDDING_REQUESTS.labels(purpose, provider_outcome)


def embedded(*, purpose: str, outcome: str, seconds: float) -> None:
    """Record one embedding call: its provider outcome and its time."""
    EMBEDDING_REQUESTS.labels(purpose, outcome).inc()
    EMBEDDING_DURATION.labels(purpose).observe(seconds)


def tasks_embedded(count: int) -> None:
    """Count tasks whose vectors the worker stored."""
    EMBEDDED_TASKS.inc(count)


def embedding_backlog(depth: int, age_seconds: float) -> None:
    """Record the tasks waiting to be embedded and the age of the oldest."""
    EMBEDDING_BACKLOG.set(depth)
    EMBEDDING_BACKLOG_AGE.set(age_seconds)
