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

Counts kept in this process (the ``memory://`` storage, and every storage's fail-over) are our
own `LocalWindows`, the same arithmetic as the `limits` storages: `limits`' memory storage takes
an asyncio lock and schedules an expiry task on every hit, which cost more than the rest of the
check; one event loop needs neither.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
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


class LocalWindows:
    """Sliding-window counters of one process, for the ``memory://`` storage.

    Each key counts hits in fixed windows of the rule's length, aligned on the clock like the
    `limits` storages; a hit is allowed while ``previous * (share of the previous window still
    inside the sliding one) + current`` stays within the limit. No method awaits, so on one
    event loop no other call can come between reading a count and adding to it: no lock is
    needed. Keys whose windows have passed are swept now and then, so callers that went away
    do not grow the table.
    """

    _SWEEP_EVERY = 4096

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # key -> [index of its current window, hits in the window before, hits in it, length]
        self._counts: dict[str, list[int]] = {}
        self._hits_since_sweep = 0

    def _window(self, key: str, expiry: int, now: float) -> tuple[int, int, float]:
        """(previous count, current count, weight of the previous window) at `now`."""
        index = int(now // expiry)
        weight = 1.0 - (now / expiry) % 1.0
        entry = self._counts.get(key)
        if entry is None or entry[0] < index - 1:
            return 0, 0, weight
        if entry[0] == index - 1:
            return entry[2], 0, weight
        return entry[1], entry[2], weight

    def hit(self, key: str, limit: int, expiry: int) -> bool:
        """Count one hit on `key` if `limit` hits per `expiry` seconds allow it."""
        now = self._clock()
        previous, current, weight = self._window(key, expiry, now)
        if math.floor(previous * weight + current) + 1 > limit:
            return False
        self._counts[key] = [int(now // expiry), previous, current + 1, expiry]
        self._hits_since_sweep += 1
        if self._hits_since_sweep >= self._SWEEP_EVERY:
            self._sweep(now)
        return True

    def test(self, key: str, limit: int, expiry: int) -> bool:
        """Whether one more hit on `key` would be allowed now, without counting it."""
        previous, current, weight = self._window(key, expiry, self._clock())
        return previous * weight + current < limit

    def retry_after(self, key: str, expiry: int) -> float:
        """Seconds until the weighted count of `key` next drops, as `limits` computes it."""
        now = self._clock()
        previous, current, weight = self._window(key, expiry, now)
        waits = [math.inf]
        if previous:
            waits.append((weight * expiry) % (expiry / previous))
        if current:
            waits.append((1.0 - (now / expiry) % 1.0) * expiry)
        wait = min(waits)
        return 0.0 if math.isinf(wait) else wait

    def _sweep(self, now: float) -> None:
        # An entry counts until two of its windows have passed (then it is neither the
        # current nor the previous window).
        self._hits_since_sweep = 0
        self._counts = {
            key: entry for key, entry in self._counts.items() if now < (entry[0] + 2) * entry[3]
        }

    def __len__(self) -> int:
        return len(self._counts)

    def reset(self) -> None:
        """Forget every count."""
        self._counts.clear()


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
        # Counts kept in this process: all of them with the memory storage, and those taken
        # while the shared storage is out of reach.
        self._local = LocalWindows()
        self._shared = not isinstance(storage, MemoryStorage)
        # (method class, roles) -> its rule: the same few combinations come on every call.
        self._rule_cache: dict[tuple[str, frozenset[str]], RateLimitItem | None] = {}
        self._fail_closed = frozenset(fail_closed)
        self._storage_retry_at = 0.0
        self._storage_is_up = True
        self._storage_up = RATE_LIMIT_STORAGE_UP.labels(service)
        self._storage_up.set(1)

    def rule_for(self, method_class: str, roles: Iterable[str]) -> RateLimitItem | None:
        """The most generous rule that applies to a caller with `roles` on `method_class`."""
        cache_key = (method_class, roles if isinstance(roles, frozenset) else frozenset(roles))
        try:
            return self._rule_cache[cache_key]
        except KeyError:
            pass
        candidates = [
            self._rules[key]
            for role in cache_key[1]
            for key in (f"{role}:{method_class}", f"{role}:*")
            if key in self._rules
        ]
        if candidates:
            rule: RateLimitItem | None = max(candidates, key=lambda r: r.amount / r.get_expiry())
        else:
            rule = self._rules.get(method_class) or self._rules.get("general")
        if len(self._rule_cache) < 1024:
            self._rule_cache[cache_key] = rule
        return rule

    async def hit(self, *, key: str, method_class: str, roles: Iterable[str]) -> RateDecision:
        """Count one request by `key` (the caller) and say whether it is allowed.

        Raises:
            RateLimitStorageUnavailableError: The shared storage cannot be reached and
                `method_class` fails closed (MHV-018).
        """
        rule = self.rule_for(method_class, roles)
        if rule is None:
            return RateDecision(True, "unlimited", 0.0)
        if not self._shared:
            return self._hit_local(rule, method_class, key)
        if self._storage_usable():
            try:
                decision = await self._hit_shared(rule, method_class, key)
            except StorageError as exc:
                self._storage_failed(exc)
            else:
                self._storage_answered()
                return decision
        self._degraded(method_class)
        return self._hit_local(rule, method_class, key)

    def _hit_local(self, rule: RateLimitItem, method_class: str, key: str) -> RateDecision:
        counter = f"{method_class}/{rule.amount}/{rule.get_expiry()}/{key}"
        if self._local.hit(counter, rule.amount, rule.get_expiry()):
            return RateDecision(True, str(rule), 0.0)
        RATE_LIMIT_REJECTIONS.labels(service=self._service, method_class=method_class).inc()
        retry_after = self._local.retry_after(counter, rule.get_expiry())
        return RateDecision(False, str(rule), max(retry_after, 0.001))

    async def _hit_shared(self, rule: RateLimitItem, method_class: str, key: str) -> RateDecision:
        if await self._limiter.hit(rule, self._service, method_class, key):
            return RateDecision(True, str(rule), 0.0)
        reset_at, _remaining = await self._limiter.get_window_stats(
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
        if self._shared and self._storage_usable():
            try:
                allowed = await self._limiter.test(rule, self._service, method_class, key)
            except StorageError as exc:
                self._storage_failed(exc)
            else:
                self._storage_answered()
                return bool(allowed)
        if self._shared:
            self._degraded(method_class)
        counter = f"{method_class}/{rule.amount}/{rule.get_expiry()}/{key}"
        return self._local.test(counter, rule.amount, rule.get_expiry())

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

    def _degraded(self, method_class: str) -> None:
        """Count in this process while the shared storage is out of reach, or MHV-018."""
        if method_class in self._fail_closed:
            RATE_LIMIT_DEGRADED.labels(self._service, method_class, "refused").inc()
            raise RateLimitStorageUnavailableError(retry_after=STORAGE_RETRY_SECONDS)
        RATE_LIMIT_DEGRADED.labels(self._service, method_class, "local").inc()

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
        self._local.reset()
        await self._storage.reset()
