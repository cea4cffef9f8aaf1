"""Admission control: a bound on requests in progress per process, and refusal while draining.

A process that takes every request it is sent queues them (for a database connection, for the
event loop) until each waits longer than its caller does: at several times what the machine
can serve, every request is slow and many fail half-way. Instead each listener admits at most
``MHV_MAX_IN_FLIGHT`` requests at once and sheds the rest at the door, before any work is
done, with a retryable answer (MHV-017: gRPC UNAVAILABLE with RetryInfo, HTTP 503 with
Retry-After). Admitted requests keep a bounded wait; shed ones cost almost nothing; a caller
that retries after the advised delay gets through once the load drops.

The same door closes on shutdown: once draining (`Admission.drain`), every new request is
refused with MHV-016 while those already admitted run to completion (`Admission.idle`), so a
rolling restart loses nothing and tells callers to go elsewhere.

Health, reflection and metrics are never counted: a saturated process must still answer its
probes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from prometheus_client import Counter, Gauge

from mhv_common.errors import ServerDrainingError, ServerOverloadedError

ADMISSION_IN_FLIGHT = Gauge(
    "admission_in_flight",
    "Requests admitted and still in progress, by listener.",
    ["service", "listener"],
    multiprocess_mode="livesum",
)
ADMISSION_LIMIT = Gauge(
    "admission_limit",
    "Most requests a listener admits at once (0: no limit).",
    ["service", "listener"],
    multiprocess_mode="livesum",
)
ADMISSION_REJECTIONS = Counter(
    "admission_rejections_total",
    "Requests refused at admission: overloaded (MHV-017) or draining (MHV-016).",
    ["service", "listener", "reason"],
)

# What a shed caller is told to wait: long enough for some of the requests in progress to
# finish, short enough that a retry soon finds room.
DEFAULT_RETRY_AFTER_SECONDS = 1.0


class Admission:
    """The door of one listener (gRPC or HTTPS) of one process.

    Args:
        service: Service name, for the metrics.
        listener: ``grpc`` or ``https``, for the metrics.
        max_in_flight: Requests admitted at once; 0 admits any number (draining still refuses).
        retry_after: The delay shed callers are advised to wait, in seconds.
    """

    def __init__(
        self,
        *,
        service: str,
        listener: str,
        max_in_flight: int,
        retry_after: float = DEFAULT_RETRY_AFTER_SECONDS,
    ) -> None:
        self._limit = max_in_flight
        self._retry_after = retry_after
        self._in_flight = 0
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._gauge = ADMISSION_IN_FLIGHT.labels(service, listener)
        ADMISSION_LIMIT.labels(service, listener).set(max_in_flight)
        self._overloaded = ADMISSION_REJECTIONS.labels(service, listener, "overloaded")
        self._refused_draining = ADMISSION_REJECTIONS.labels(service, listener, "draining")

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._in_flight

    @property
    def draining(self) -> bool:
        """Whether new requests are refused because the process is stopping."""
        return self._draining

    def enter(self) -> None:
        """Take a place for one request; `leave` gives it back.

        Raises:
            ServerDrainingError: The process is shutting down (MHV-016).
            ServerOverloadedError: `max_in_flight` requests are in progress (MHV-017).
        """
        if self._draining:
            self._refused_draining.inc()
            raise ServerDrainingError(retry_after=self._retry_after)
        if self._limit and self._in_flight >= self._limit:
            self._overloaded.inc()
            raise ServerOverloadedError(retry_after=self._retry_after)
        self._in_flight += 1
        self._idle.clear()
        self._gauge.inc()

    def leave(self) -> None:
        """Give back the place `enter` took."""
        self._in_flight -= 1
        self._gauge.dec()
        if self._in_flight == 0:
            self._idle.set()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a place for the enclosed request (`enter`, then `leave`).

        Raises:
            ServerDrainingError: The process is shutting down (MHV-016).
            ServerOverloadedError: `max_in_flight` requests are in progress (MHV-017).
        """
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def drain(self) -> None:
        """Refuse every new request from now on (MHV-016); admitted ones go on."""
        self._draining = True

    async def idle(self, *, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no admitted request is left; True if none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()
