"""The HTTPS edge: routes, body cap read as a stream, rate limits, and the JSON error body.

Order of checks for ``POST /webhooks/{source}``, cheapest first: known source (404), rate
limit (429), declared Content-Length (413), body streamed up to the cap (413 as soon as it is
exceeded, without reading the rest), authentication on the raw bytes (401), headers and JSON
(400), then the atomic claim-and-enqueue. 202 is sent only after the inbox row is committed;
a repeat gets 200 naming MHV-301. Every rejection carries `MahavishnuError.to_dict()`; nothing
internal (exception text, SQL, paths) ever reaches the sender.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping

from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mhv_common import context
from mhv_common.edge import classify
from mhv_common.errors import (
    FieldViolation,
    InternalError,
    MahavishnuError,
    RateLimitExceededError,
    ValidationError,
    WebhookPayloadTooLargeError,
    WebhookReplayDetectedError,
    WebhookSignatureInvalidError,
    WebhookSourceUnknownError,
    WebhookTimestampInvalidError,
)
from mhv_common.ratelimit import RateLimiter
from mhv_webhook._ingest import Ingestor
from mhv_webhook._metrics import ACK_DURATION, BODY_BYTES, DELIVERIES, REQUESTS
from mhv_webhook._sources import Source
from mhv_webhook._verify import HeaderView

logger = logging.getLogger("mhv.webhook.http")
tracer = trace.get_tracer("mhv_webhook")
# Requests per client address before verification: generous, it only stops floods.
UNVERIFIED_RATE_CLASS = "webhook_unverified"

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


def error_response(
    error: MahavishnuError, *, status: int | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    """The plan's JSON error body, with Retry-After for retryable errors."""
    extra = dict(headers or {})
    if error.retry_after is not None:
        extra["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return JSONResponse(error.to_dict(), status_code=status or error.http_status, headers=extra)


def _outcome(error: MahavishnuError) -> str:
    return next((name for kind, name in _OUTCOMES if isinstance(error, kind)), "error")


def _trace_carrier(headers: HeaderView) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for name, pattern in (("traceparent", _TRACEPARENT), ("tracestate", _TRACESTATE)):
        try:
            value = headers.get(name)
        except ValidationError:
            continue  # a broken trace header is not the sender's delivery problem
        if value and pattern.match(value):
            carrier[name] = value
    return carrier


class WebhookEdge:
    """The ASGI application of the gateway.

    Args:
        sources: Declared sources by name.
        ingestor: The receiving domain.
        addresses: Request budget per client address, spent before anything is verified.
        ack_deadline_seconds: Budget for storing a delivery once its body is read.
        body_timeout_seconds: Longest time a sender may take to send its body.

    """

    def __init__(
        self,
        sources: Mapping[str, Source],
        ingestor: Ingestor,
        *,
        addresses: RateLimiter,
        ack_deadline_seconds: float = 10.0,
        body_timeout_seconds: float = 30.0,
    ) -> None:
        self._addresses = addresses
        self._sources = dict(sources)
        self._ingestor = ingestor
        self._ack_deadline = ack_deadline_seconds
        self._body_timeout = body_timeout_seconds
        self.app = Starlette(
            routes=[
                Route("/webhooks/{source}", self.receive, methods=["POST"]),
                Route("/healthz", self.healthz, methods=["GET"]),
            ],
            exception_handlers={
                HTTPException: self._http_error,
                Exception: self._unexpected,
            },
        )

    async def healthz(self, _request: Request) -> Response:
        """Liveness of the HTTPS listener."""
        return JSONResponse({"status": "ok"})

    async def _http_error(self, _request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return error_response(WebhookSourceUnknownError("No such endpoint."))
        if status == 405:
            return error_response(
                ValidationError("Use POST /webhooks/<source> to deliver a webhook."), status=405
            )
        return error_response(ValidationError("The request is invalid."), status=max(status, 400))

    async def _unexpected(self, _request: Request, exc: Exception) -> Response:
        logger.error("unhandled exception at the HTTPS edge", exc_info=exc)
        return error_response(InternalError())

    async def _read_body(self, request: Request, headers: HeaderView, source: Source) -> bytes:
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
            async with asyncio.timeout(self._body_timeout):
                async for chunk in request.stream():
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
                f"The body was not received within {self._body_timeout:g} s."
            ) from None
        return b"".join(chunks)

    async def receive(self, request: Request) -> Response:
        """``POST /webhooks/{source}``."""
        started = time.perf_counter()
        name = str(request.path_params["source"])
        source = self._sources.get(name)
        label = source.name if source is not None else "unknown"
        request_id = uuid.uuid4().hex
        headers = HeaderView(request.scope["headers"])
        ctx = context.RequestContext(request_id=request_id, method="POST /webhooks/{source}")
        outcome = "error"
        response: Response
        with (
            context.bind(ctx),
            tracer.start_as_current_span(
                "POST /webhooks/{source}",
                context=propagate.extract(_trace_carrier(headers)),
                kind=trace.SpanKind.SERVER,
                attributes={"webhook.source": label},
            ),
        ):
            try:
                # Before anything is read or verified, a budget per client address: unsigned
                # junk from one address cannot crowd out the real sender. The per-source
                # budget is spent only by verified deliveries (in the ingestor).
                client = request.client.host if request.client else "unknown"
                decision = await self._addresses.hit(
                    key=client, method_class=UNVERIFIED_RATE_CLASS, roles=()
                )
                if not decision.allowed:
                    raise RateLimitExceededError(
                        f"Rate limit {decision.limit} for requests from {client} exceeded.",
                        retry_after=decision.retry_after,
                    )
                if source is None:
                    raise WebhookSourceUnknownError()
                # Junk without (or with stale, or, for a GitLab token, wrong) credentials is
                # refused before a byte of its body is read or buffered.
                self._ingestor.precheck(source, headers)
                body = await self._read_body(request, headers, source)
                ctx.deadline = time.monotonic() + self._ack_deadline
                outgoing: dict[str, str] = {}
                propagate.inject(outgoing)
                receipt = await self._ingestor.receive(
                    source,
                    headers,
                    body,
                    traceparent=outgoing.get("traceparent"),
                    tracestate=outgoing.get("tracestate") or None,
                    timeout=context.time_left(),
                )
                if receipt.accepted:
                    outcome = "accepted"
                    response = JSONResponse(
                        {
                            "status": "accepted",
                            "id": str(receipt.id),
                            "delivery_id": receipt.delivery_id,
                        },
                        status_code=202,
                    )
                else:
                    outcome = "duplicate"
                    response = error_response(
                        WebhookReplayDetectedError(
                            "This webhook delivery was already received; it is not processed again."
                        )
                    )
            except ClientDisconnect:
                # The sender hung up mid-body: nothing stored, nobody to answer.
                outcome = "malformed"
                response = Response(status_code=400)
            except Exception as exc:
                error = classify(exc)
                if isinstance(error, InternalError) and error is not exc:
                    logger.error("unhandled exception while receiving", exc_info=exc)
                outcome = _outcome(error)
                ctx.error_code = error.code
                close = (
                    {"Connection": "close"}
                    if isinstance(error, WebhookPayloadTooLargeError)
                    else {}
                )
                response = error_response(error, headers=close)
            response.headers["x-request-id"] = request_id
            elapsed = time.perf_counter() - started
            REQUESTS.labels(label, str(response.status_code)).inc()
            DELIVERIES.labels(label, outcome).inc()
            ACK_DURATION.labels(label).observe(elapsed)
            if outcome not in ("accepted", "duplicate"):
                logger.info(
                    "webhook rejected",
                    extra={
                        "source": label,
                        "outcome": outcome,
                        "error_code": ctx.error_code,
                        "status": response.status_code,
                    },
                )
            return response
