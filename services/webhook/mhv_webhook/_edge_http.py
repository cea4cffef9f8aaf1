"""The HTTPS edge: routes, and the webhook endpoint (decode, call the ingest, encode).

``POST /webhooks/{source}`` runs through the middleware in `mhv_webhook._edge_middleware`
(address budget, source, credentials on headers, body cap, error body, metrics, span); what
reaches the endpoint is a request from a declared source whose body is read. The endpoint
hands it to the `Ingestor` and answers 202 once the inbox row is committed, or 200 naming
MHV-301 for a repeat. ``GET /healthz`` answers whether the listener serves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import propagate
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mhv_common import context
from mhv_common.admission import Admission
from mhv_common.errors import (
    InternalError,
    ValidationError,
    WebhookReplayDetectedError,
    WebhookSourceUnknownError,
)
from mhv_common.ratelimit import RateLimiter
from mhv_webhook._edge_middleware import error_response, exchange, webhook_middleware
from mhv_webhook._ingest import Ingestor
from mhv_webhook._sources import Source

logger = logging.getLogger("mhv.webhook.http")


class WebhookEdge:
    """The ASGI application of the gateway.

    Args:
        sources: Declared sources by name.
        ingestor: The receiving domain.
        addresses: Request budget per client address, spent before anything is verified.
        admission: The listener's door: requests in progress, and refusal while draining.
        ack_deadline_seconds: Budget for storing a delivery once its body is read.
        body_timeout_seconds: Longest time a sender may take to send its body.

    """

    def __init__(
        self,
        sources: Mapping[str, Source],
        ingestor: Ingestor,
        *,
        addresses: RateLimiter,
        admission: Admission,
        ack_deadline_seconds: float = 10.0,
        body_timeout_seconds: float = 30.0,
    ) -> None:
        self._ingestor = ingestor
        self.app = Starlette(
            routes=[
                Route(
                    "/webhooks/{source}",
                    self.receive,
                    methods=["POST"],
                    middleware=webhook_middleware(
                        sources=sources,
                        ingestor=ingestor,
                        addresses=addresses,
                        admission=admission,
                        body_timeout_seconds=body_timeout_seconds,
                        ack_deadline_seconds=ack_deadline_seconds,
                    ),
                ),
                Route("/healthz", self.healthz, methods=["GET"]),
            ],
            exception_handlers={
                HTTPException: self._http_error,
                Exception: self._unexpected,
            },
        )

    async def receive(self, request: Request) -> Response:
        """``POST /webhooks/{source}``: store the delivery; 202, or 200 (MHV-301) for a repeat."""
        ex = exchange(request.scope)
        assert ex.source is not None  # the middleware answered 404 for unknown sources
        # The delivery carries this request's trace on to its processing.
        outgoing: dict[str, str] = {}
        propagate.inject(outgoing)
        receipt = await self._ingestor.receive(
            ex.source,
            ex.headers,
            ex.body,
            traceparent=outgoing.get("traceparent"),
            tracestate=outgoing.get("tracestate") or None,
            timeout=context.time_left(),
        )
        if not receipt.accepted:
            ex.outcome = "duplicate"
            return error_response(
                WebhookReplayDetectedError(
                    "This webhook delivery was already received; it is not processed again."
                )
            )
        ex.outcome = "accepted"
        return JSONResponse(
            {"status": "accepted", "id": str(receipt.id), "delivery_id": receipt.delivery_id},
            status_code=202,
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
