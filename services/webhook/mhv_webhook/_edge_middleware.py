"""The HTTPS edge's cross-cutting work: one ordered list of ASGI middleware, first = outermost.

    Arrival (source, headers, request id)  ->  Tracing (server span)
      ->  RequestScope (request context, x-request-id)  ->  Telemetry (metrics, log line)
      ->  ErrorBody (the catch-all: any failure becomes the catalog's JSON body)
      ->  Door (503 + Retry-After: shed, MHV-017, or draining, MHV-016)
      ->  AddressBudget (429)  ->  Authentication (404, 401 on headers alone)
      ->  BodyCap (413, body timeout)  ->  AckDeadline  ->  endpoint (`mhv_webhook._edge_http`)

The list (`webhook_middleware`) wraps ``POST /webhooks/{source}`` only, the way the gRPC
interceptors (`mhv_common.interceptors`) wrap every RPC. Order of checks, cheapest first: the
client address's budget, the source, the credentials that need no body, the body read as a
stream up to the source's cap; only then does the endpoint verify the raw bytes, parse them
and enqueue. ErrorBody sits outside every check so that Telemetry, outside it, records the
status and outcome the sender receives; its classification is `mhv_common.edge.classify`, the
one the gRPC edge uses. Nothing internal (exception text, SQL, paths) ever reaches the sender.

The layers share one `Exchange` per request, kept in the ASGI scope (`exchange`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import propagate, trace
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mhv_common import context
from mhv_common.admission import Admission
from mhv_common.edge import REQUEST_ID_KEY, classify
from mhv_common.errors import (
    FieldViolation,
    InternalError,
    MahavishnuError,
    RateLimitExceededError,
    ValidationError,
    WebhookPayloadTooLargeError,
    WebhookSignatureInvalidError,
    WebhookSourceUnknownError,
    WebhookTimestampInvalidError,
)
from mhv_common.ratelimit import RateLimiter
from mhv_webhook._headers import HeaderView
from mhv_webhook._ingest import Ingestor
from mhv_webhook._metrics import ACK_DURATION, BODY_BYTES, DELIVERIES, REQUESTS
from mhv_webhook._sources import Source

logger = logging.getLogger("mhv.webhook.http")
tracer = trace.get_tracer("mhv_webhook")

ROUTE = "POST /webhooks/{source}"
# Requests per client address before verification: generous, it only stops floods.
UNVERIFIED_RATE_CLASS = "webhook_unverified"

_EXCHANGE = "mhv.webhook.exchange"
_REQUEST_ID_HEADER = REQUEST_ID_KEY.encode("ascii")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_TRACESTATE = re.compile(r"^[\x20-\x7e]{1,512}$")
_DIGITS = re.compile(r"^[0-9]{1,20}$")
_OUTCOMES: tuple[tuple[type[MahavishnuError], str], ...] = (
    (WebhookSignatureInvalidError, "bad_signature"),
    (WebhookTimestampInvalidError, "bad_timestamp"),
    (WebhookPayloadTooLargeError, "too_large"),
    (RateLimitExceededError, "rate_limited"),
    (ValidationError, "malformed"),
    (WebhookSourceUnknownError, "malformed"),
)
_ANSWERED = ("accepted", "duplicate")


@dataclass(slots=True)
class Exchange:
    """One request as the layers learn about it.

    Attributes:
        started: `time.perf_counter` at arrival.
        source: The declared source named by the path, or None (answered 404).
        label: Metric label: the source's name, or ``unknown``.
        headers: The request headers.
        request_id: Sent back as ``x-request-id``; names the request in logs.
        context: The request context bound for the whole request.
        status: HTTP status of the answer, once it started (0 before).
        outcome: Metric outcome (`mhv_webhook._metrics.OUTCOMES`), set by whoever answers.
        body: The body, once read (BodyCap).
    """

    started: float
    source: Source | None
    label: str
    headers: HeaderView
    request_id: str
    context: context.RequestContext
    status: int = 0
    outcome: str = "error"
    body: bytes = b""


def exchange(scope: Scope) -> Exchange:
    """The `Exchange` of the request `scope` belongs to."""
    found: Exchange = scope[_EXCHANGE]
    return found


def error_response(
    error: MahavishnuError, *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    """The plan's JSON error body, with Retry-After for retryable errors."""
    extra = dict(headers or {})
    if error.retry_after is not None:
        extra["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(error.to_dict(), status_code=status or error.http_status, headers=extra)


def outcome_of(error: MahavishnuError) -> str:
    """The ``webhook_deliveries_total`` outcome of a refused request."""
    return next((name for kind, name in _OUTCOMES if isinstance(error, kind)), "error")


def trace_carrier(headers: HeaderView) -> dict[str, str]:
    """The sender's well-formed W3C trace headers; anything else is dropped."""
    carrier: dict[str, str] = {}
    for name, pattern in (("traceparent", _TRACEPARENT), ("tracestate", _TRACESTATE)):
        try:
            value = headers.get(name)
        except ValidationError:
            continue  # a broken trace header is not the sender's delivery problem
        if value and pattern.match(value):
            carrier[name] = value
    return carrier


class Arrival:
    """Notes the request: arrival time, the source its path names, headers, request id."""

    def __init__(self, app: ASGIApp, *, sources: Mapping[str, Source]) -> None:
        self.app = app
        self._sources = dict(sources)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Create the request's `Exchange`."""
        started = time.perf_counter()
        source = self._sources.get(str(scope["path_params"]["source"]))
        request_id = uuid.uuid4().hex
        scope[_EXCHANGE] = Exchange(
            started=started,
            source=source,
            label=source.name if source is not None else "unknown",
            headers=HeaderView(scope["headers"]),
            request_id=request_id,
            context=context.RequestContext(request_id=request_id, method=ROUTE),
        )
        await self.app(scope, receive, send)


class Tracing:
    """The server span of the request, continuing the sender's trace when it sent one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request inside its span."""
        ex: Exchange = scope[_EXCHANGE]
        with tracer.start_as_current_span(
            ROUTE,
            context=propagate.extract(trace_carrier(ex.headers)),
            kind=trace.SpanKind.SERVER,
            attributes={"webhook.source": ex.label},
        ):
            await self.app(scope, receive, send)


class RequestScope:
    """Binds the request context; names the request in its answer (``x-request-id``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request with its context bound; note the answer's status."""
        ex: Exchange = scope[_EXCHANGE]
        request_id = (_REQUEST_ID_HEADER, ex.request_id.encode("ascii"))

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id]
            await send(message)

        with context.bind(ex.context):
            await self.app(scope, receive, answer)


class Telemetry:
    """The request metrics, and one log line per refused request, with the final status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count and time the request once it is answered."""
        ex: Exchange = scope[_EXCHANGE]
        await self.app(scope, receive, send)
        REQUESTS.labels(ex.label, str(ex.status)).inc()
        DELIVERIES.labels(ex.label, ex.outcome).inc()
        ACK_DURATION.labels(ex.label).observe(time.perf_counter() - ex.started)
        if ex.outcome not in _ANSWERED:
            logger.info(
                "webhook rejected",
                extra={
                    "source": ex.label,
                    "outcome": ex.outcome,
                    "error_code": ex.context.error_code,
                    "status": ex.status,
                },
            )


class ErrorBody:
    """The catch-all: every failure below becomes the catalog's JSON body, never a traceback.

    A refused body that was not read to its end is answered with ``Connection: close``; a
    sender that hung up mid-body gets a bare 400 (nobody reads it).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request; answer its failure."""
        ex: Exchange = scope[_EXCHANGE]
        try:
            await self.app(scope, receive, send)
        except ClientDisconnect:
            # The sender hung up mid-body: nothing stored, nobody to answer.
            ex.outcome = "malformed"
            await Response(status_code=400)(scope, receive, send)
        except Exception as exc:
            if ex.status:
                raise  # the answer has begun; there is nothing left to map
            error = classify(exc)
            if isinstance(error, InternalError) and error is not exc:
                logger.error("unhandled exception while receiving", exc_info=exc)
            ex.outcome = outcome_of(error)
            ex.context.error_code = error.code
            close = (
                {"Connection": "close"} if isinstance(error, WebhookPayloadTooLargeError) else None
            )
            await error_response(error, headers=close)(scope, receive, send)


class Door:
    """Admission control (`mhv_common.admission`): a bounded number of requests in progress.

    Over the bound, or once the gateway is shutting down, a request is answered 503 with
    Retry-After before anything is read, verified or stored; the sender delivers it again.
    """

    def __init__(self, app: ASGIApp, *, admission: Admission) -> None:
        self.app = app
        self._admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request holding a place, or refuse it (MHV-016, MHV-017)."""
        with self._admission.admit():
            await self.app(scope, receive, send)


class AddressBudget:
    """A request budget per client address, spent before anything is read or verified.

    Unsigned junk from one address cannot crowd out the real sender; the per-source budget is
    spent only by verified deliveries (`mhv_webhook._ingest`).
    """

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self._limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request with MHV-006 when its address is over budget."""
        client = scope.get("client")
        address = client[0] if client else "unknown"
        decision = await self._limiter.hit(
            key=address, method_class=UNVERIFIED_RATE_CLASS, roles=()
        )
        if not decision.allowed:
            raise RateLimitExceededError(
                f"Rate limit {decision.limit} for requests from {address} exceeded.",
                retry_after=decision.retry_after,
            )
        await self.app(scope, receive, send)


class Authentication:
    """A declared source, and the credentials that need no body, before a byte is read.

    Junk without (or with stale, or, for a GitLab token, wrong) credentials is refused before
    any of its body is read or buffered.
    """

    def __init__(self, app: ASGIApp, *, ingestor: Ingestor) -> None:
        self.app = app
        self._ingestor = ingestor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse an unknown source (MHV-306) or missing credentials (MHV-300, MHV-304)."""
        ex: Exchange = scope[_EXCHANGE]
        if ex.source is None:
            raise WebhookSourceUnknownError()
        self._ingestor.precheck(ex.source, ex.headers)
        await self.app(scope, receive, send)


class BodyCap:
    """Reads the body as a stream up to the source's cap, within the body timeout.

    A declared Content-Length over the cap is refused without reading; a stream is cut as
    soon as it passes the cap, so the rest is never buffered.
    """

    def __init__(self, app: ASGIApp, *, timeout_seconds: float) -> None:
        self.app = app
        self._timeout = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body into the exchange."""
        ex: Exchange = scope[_EXCHANGE]
        assert ex.source is not None  # Authentication refused unknown sources
        ex.body = await self._read(receive, ex.source, ex.headers)
        await self.app(scope, receive, send)

    async def _read(self, receive: Receive, source: Source, headers: HeaderView) -> bytes:
        cap = source.body_cap_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not _DIGITS.match(declared):
                raise ValidationError(
                    "The Content-Length header is not a number.",
                    violations=[FieldViolation("content-length", "must be a byte count")],
                )
            if int(declared) > cap:
                raise WebhookPayloadTooLargeError(
                    f"The body of {declared} bytes exceeds this source's {cap}-byte limit."
                )
        chunks: list[bytes] = []
        received = 0
        counter = BODY_BYTES.labels(source.name)
        try:
            async with asyncio.timeout(self._timeout):
                more = True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect()
                    chunk: bytes = message.get("body", b"")
                    more = message.get("more_body", False)
                    if not chunk:
                        continue
                    received += len(chunk)
                    counter.inc(len(chunk))
                    if received > cap:
                        # Stop reading here: the rest is never buffered.
                        raise WebhookPayloadTooLargeError(
                            f"The body exceeds this source's {cap}-byte limit."
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise ValidationError(
                f"The body was not received within {self._timeout:g} s."
            ) from None
        return b"".join(chunks)


class AckDeadline:
    """The budget for storing a delivery once its body is read (the sender is waiting)."""

    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self.app = app
        self._seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Set the request's deadline."""
        ex: Exchange = scope[_EXCHANGE]
        ex.context.deadline = time.monotonic() + self._seconds
        await self.app(scope, receive, send)


def webhook_middleware(
    *,
    sources: Mapping[str, Source],
    ingestor: Ingestor,
    addresses: RateLimiter,
    admission: Admission,
    body_timeout_seconds: float,
    ack_deadline_seconds: float,
) -> list[Middleware]:
    """The ordered middleware of ``POST /webhooks/{source}`` (first = outermost)."""
    return [
        Middleware(Arrival, sources=sources),
        Middleware(Tracing),
        Middleware(RequestScope),
        Middleware(Telemetry),
        Middleware(ErrorBody),
        Middleware(Door, admission=admission),
        Middleware(AddressBudget, limiter=addresses),
        Middleware(Authentication, ingestor=ingestor),
        Middleware(BodyCap, timeout_seconds=body_timeout_seconds),
        Middleware(AckDeadline, seconds=ack_deadline_seconds),
    ]
