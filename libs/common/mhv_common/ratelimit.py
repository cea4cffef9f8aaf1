"""Rate limiting on the `limits` library: per caller, per method class, per role.

Limits are sliding windows (the weighted two-bucket approximation of a moving window: O(1) per
request; an exact moving window keeps one timestamp per request and costs O(limit)), kept in
memory by default; point ``MHV_RATE_LIMIT_STORAGE_URI`` at
Redis (``redis://host:6379``) so that several replicas share one budget per caller.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from prometheus_client import Counter

from mhv_common.errors import ConfigurationError, RateLimitExceededError

RATE_LIMIT_REJECTIONS = Counter(
    "rate_limit_rejections_total",
    "Requests refused by the rate limiter.",
    ["service", "method_class"],
)


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Outcome of one check."""

    allowed: bool
    limit: str
    retry_after: float


def _async_uri(uri: str) -> str:
    return uri if uri.startswith("async+") else f"async+{uri}"


class RateLimiter:
    """Checks and counts hits against configured limits.

    Args:
        limits: Rules keyed by method class (``create``), ``role:class`` or ``role:*``.
            Values use the `limits` notation, e.g. ``10/minute``.
        storage_uri: `limits` storage URI: ``memory://`` or ``redis://host:port``.
        service: Service name, for the rejection metric.
    """

    def __init__(self, limits: Mapping[str, str], *, storage_uri: str, service: str) -> None:
        self._rules: dict[str, RateLimitItem] = {}
        for key, text in limits.items():
            try:
                self._rules[key] = parse(text)
            except ValueError as exc:
                raise ConfigurationError(
                    f"MHV_RATE_LIMITS: {key!r} has an invalid limit {text!r}."
                ) from exc
        try:
            storage = storage_from_string(_async_uri(storage_uri))
        except Exception as exc:
            raise ConfigurationError(
                "MHV_RATE_LIMIT_STORAGE_URI is not a supported storage."
            ) from exc
        if not isinstance(storage, Storage):
            raise ConfigurationError("MHV_RATE_LIMIT_STORAGE_URI is not an asyncio storage.")
        self._storage = storage
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._service = service

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
        """Count one request by `key` (the caller) and say whether it is allowed."""
        rule = self.rule_for(method_class, roles)
        if rule is None:
            return RateDecision(True, "unlimited", 0.0)
        if await self._limiter.hit(rule, self._service, method_class, key):
            return RateDecision(True, str(rule), 0.0)
        reset_at, _remaining = await self._limiter.get_window_stats(
            rule, self._service, method_class, key
        )
        RATE_LIMIT_REJECTIONS.labels(service=self._service, method_class=method_class).inc()
        return RateDecision(False, str(rule), max(reset_at - time.time(), 0.001))

    async def peek(self, *, key: str, method_class: str, roles: Iterable[str]) -> bool:
        """Whether one more request by `key` would be allowed now, without counting it."""
        rule = self.rule_for(method_class, roles)
        if rule is None:
            return True
        return bool(await self._limiter.test(rule, self._service, method_class, key))

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
