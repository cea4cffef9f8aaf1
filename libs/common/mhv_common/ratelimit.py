"""Rate limiting on the `limits` library: per caller, per method class, per role.

Limits are sliding windows (the weighted two-bucket approximation of a moving window: O(1) per
request; an exact moving window keeps one timestamp per request and costs O(limit)), kept in
memory by default; point ``MHV_RATE_LIMIT_STORAGE_URI`` at
Redis (``redis://host:6379``) so that several replicas share one budget per caller.

When the shared storage cannot be reached, a class of limits either fails over to counting in
this process (the default: a caller's budget is then at most one per replica, and the service
stays up) or, if listed in ``MHV_RATE_LIMIT_FAIL_CLOSED``, refuses its requests with MHV-018
(UNAVAILABLE / 503, retryable) until the storage is back. After a failure the storage is left
alone for `STORAGE_RETRY_SECONDS`, so an outage costs one failed round trip per interval, not
one per request. ``rate_limit_storage_up`` says which state a process is in
(docs/operations/shutdown-and-overload.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from prometheus_client import Counter, Gauge

from mhv_common.errors import (
    ConfigurationError,
    RateLimitExceededError,
    RateLimitStorageUnavailableError,
)

logger = logging.getLogger(__name__)

RATE_LIMIT_REJECTIONS = Counter(
    "rate_limit_rejections_total",
    "Requests refused by the rate limiter.",
    ["service", "method_class"],
)
RATE_LIMIT_STORAGE_UP = Gauge(
    "rate_limit_storage_up",
    "1 while the rate limits' shared storage (Redis) answers, 0 while it cannot be reached.",
    ["service"],
    multiprocess_mode="livemin",
)
RATE_LIMIT_STORAGE_ERRORS = Counter(
    "rate_limit_storage_errors_total",
    "Round trips to the rate limits' shared storage that failed.",
    ["service"],
)
RATE_LIMIT_DEGRADED = Counter(
    "rate_limit_degraded_decisions_total",
    "Decisions taken without the shared storage: counted in this process (local) or refused "
    "(MHV-018, for classes that fail closed).",
    ["service", "method_class", "mode"],
)

STORAGE_RETRY_SECONDS = 1.0
"""After a failed round trip, the shared storage is not tried again for this long."""
# Socket timeouts for a Redis storage: a storage that hangs must not hold requests for long.
_REDIS_TIMEOUT_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Outcome of one check."""

    allowed: bool
    limit: str
    retry_after: float


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


def _storage_options(uri: str) -> dict[str, float | bool]:
    scheme = uri.removeprefix("async+").split("://", 1)[0]
    if scheme == "memory":
        return {}
    # Every failure of the storage becomes limits' StorageError, whatever the client library.
    options: dict[str, float | bool] = {"wrap_exceptions": True}
    if "redis" in scheme:
        options |= {
            "connect_timeout": _REDIS_TIMEOUT_SECONDS,
            "stream_timeout": _REDIS_TIMEOUT_SECONDS,
        }
    return options


class RateLimiter:
    """Checks and counts hits against configured limits.

    Args:
        limits: Rules keyed by method class (``create``), ``role:class`` or ``role:*``.
            Values use the `limits` notation, e.g. ``10/minute``.
        storage_uri: `limits` storage URI: ``memory://`` or ``redis://host:port``.
        service: Service name, for the rejection metric.
        fail_closed: Method classes refused (MHV-018) rather than counted in this process while
            the shared storage cannot be reached.
    """

    def __init__(
        self,
        limits: Mapping[str, str],
        *,
        storage_uri: str,
        service: str,
        fail_closed: Iterable[str] = (),
    ) -> None:
        self._rules: dict[str, RateLimitItem] = {}
        for key, text in limits.items():
            try:
                self._rules[key] = parse(text)
            except ValueError as exc:
                raise ConfigurationError(
                    f"MHV_RATE_LIMITS: {key!r} has an invalid limit {text!r}."
                ) from exc
        try:
            storage = storage_from_string(_async_uri(storage_uri), **_storage_options(storage_uri))
        except Exception as exc:
            raise ConfigurationError(
                "MHV_RATE_LIMIT_STORAGE_URI is not a supported storage."
            ) from exc
        if not isinstance(storage, Storage):
            raise ConfigurationError("MHV_RATE_LIMIT_STORAGE_URI is not an asyncio storage.")
        self._storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._service = service
        # Counts kept in this process while the shared storage is out of reach.
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared = not isinstance(storage, MemoryStorage)
        self._fail_closed = frozenset(fail_closed)
        self._storage_retry_at = 0.0
        self._storage_is_up = True
        self._storage_up = RATE_LIMIT_STORAGE_UP.labels(service)
        self._storage_up.set(1)

    def rule_for(self, method_class: str, roles: Iterable[str]) -> RateLimitItem | None:
        """The most generous rule that applies to a caller with `roles` on `method_class`."""
        candidates = [
            self._rules[key]
            for role in roles
            for key in (f"{role}:{method_class}", f"{role}:*")
            if key in self._rules
        ]
        if candidates:
            return max(candidates, key=lambda r: r.amount / r.get_expiry())
        return self._rules.get(method_class) or self._rules.get("general")

    async def hit(self, *, key: str, method_class: str, roles: Iterable[str]) -> RateDecision:
        """Count one request by `key` (the caller) and say whether it is allowed.

        Raises:
            RateLimitStorageUnavailableError: The shared storage cannot be reached and
                `method_class` fails closed (MHV-018).
        """
        rule = self.rule_for(method_class, roles)
        if rule is None:
            return RateDecision(True, "unlimited", 0.0)
        if self._storage_usable():
            try:
                decision = await self._hit(self._limiter, rule, method_class, key)
            except StorageError as exc:
                self._storage_failed(exc)
            else:
                self._storage_answered()
                return decision
        return await self._hit(self._degraded(method_class), rule, method_class, key)

    async def _hit(
        self,
        limiter: SlidingWindowCounterRateLimiter,
        rule: RateLimitItem,
        method_class: str,
        key: str,
    ) -> RateDecision:
        if await limiter.hit(rule, self._service, method_class, key):
            return RateDecision(True, str(rule), 0.0)
        reset_at, _remaining = await limiter.get_window_stats(
            rule, self._service, method_class, key
        )
        RATE_LIMIT_REJECTIONS.labels(service=self._service, method_class=method_class).inc()
        return RateDecision(False, str(rule), max(reset_at - time.time(), 0.001))

    async def peek(self, *, key: str, method_class: str, roles: Iterable[str]) -> bool:
        """Whether one more request by `key` would be allowed now, without counting it.

        Raises:
            RateLimitStorageUnavailableError: As `hit`.
        """
        rule = self.rule_for(method_class, roles)
        if rule is None:
            return True
        if self._storage_usable():
            try:
                allowed = await self._limiter.test(rule, self._service, method_class, key)
            except StorageError as exc:
                self._storage_failed(exc)
            else:
                self._storage_answered()
                return bool(allowed)
        local = self._degraded(method_class)
        return bool(await local.test(rule, self._service, method_class, key))

    @property
    def storage_up(self) -> bool:
        """False from a failed round trip to the shared storage until one succeeds again."""
        return self._storage_is_up

    def _storage_usable(self) -> bool:
        return not self._shared or time.monotonic() >= self._storage_retry_at

    def _storage_failed(self, exc: StorageError) -> None:
        RATE_LIMIT_STORAGE_ERRORS.labels(self._service).inc()
        self._storage_retry_at = time.monotonic() + STORAGE_RETRY_SECONDS
        if self._storage_is_up:  # the first failure of an outage is logged, not every one
            logger.error(
                "rate-limit storage unreachable; limits counted in this process meanwhile",
                extra={
                    "error": type(exc.storage_error).__name__,
                    "fail_closed": sorted(self._fail_closed),
                },
            )
        self._storage_is_up = False
        self._storage_up.set(0)

    def _storage_answered(self) -> None:
        if not self._storage_is_up:
            logger.warning("rate-limit storage reachable again")
        self._storage_is_up = True
        self._storage_up.set(1)

    def _degraded(self, method_class: str) -> SlidingWindowCounterRateLimiter:
        """The limiter to use while the shared storage is out of reach, or MHV-018."""
        if method_class in self._fail_closed:
            RATE_LIMIT_DEGRADED.labels(self._service, method_class, "refused").inc()
            raise RateLimitStorageUnavailableError(retry_after=STORAGE_RETRY_SECONDS)
        RATE_LIMIT_DEGRADED.labels(self._service, method_class, "local").inc()
        return self._local

    async def enforce(self, *, key: str, method_class: str, roles: Iterable[str]) -> None:
        """Like `hit`, but raise MHV-006 when the request is over the limit."""
        decision = await self.hit(key=key, method_class=method_class, roles=roles)
        if not decision.allowed:
            raise RateLimitExceededError(
                f"Rate limit {decision.limit} for {method_class} requests exceeded.",
                retry_after=decision.retry_after,
            )

    async def close(self) -> None:
        """Close connections to a shared storage (Redis); the memory storage has none."""
        # `limits` exposes no close; its Redis storage keeps the client on its bridge.
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            pool.disconnect()

    async def reset(self) -> None:
        """Forget all counts (tests and operators clearing a lock-out)."""
        await self._storage.reset()
