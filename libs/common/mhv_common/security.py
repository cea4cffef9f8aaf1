"""The security log: every call refused for who the caller is, as one JSON line and a count.

A call that ends UNAUTHENTICATED (no token, a bad, expired or revoked one) or PERMISSION_DENIED
(a role gate, or a domain check such as "only the relay writes audit events") is written to the
``mhv.security`` logger, apart from the access log so that it can be routed and kept on its
own, and counted in ``mhv_authz_denied_total{service, method, reason}``, the reason being the
MHV code (MHV-004 unauthenticated, MHV-005 permission denied, ...). The telemetry interceptor
records it, after every inner layer, so refusals anywhere in the call are seen once.

Nothing the caller sent is logged except who they claimed to be: no token, no metadata, no body.
The line goes through the JSON formatter's redaction like every other.
"""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter

from mhv_common import context
from mhv_common.errors import MahavishnuError

logger = logging.getLogger("mhv.security")

REFUSED_STATUSES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
"""The final statuses that make a call a refused authorization attempt."""

AUTHZ_DENIED = Counter(
    "mhv_authz_denied_total",
    "Calls refused for authentication or authorization, by MHV code.",
    ["service", "method", "reason"],
)


def is_refusal(error: MahavishnuError | None) -> bool:
    """Whether a call that ended with `error` was refused for who its caller is."""
    return error is not None and error.grpc_status in REFUSED_STATUSES


def record_refusal(error: MahavishnuError, *, service: str, method: str, peer: str) -> None:
    """Log one refused call on the security logger and count it."""
    AUTHZ_DENIED.labels(service, method, error.code).inc()
    req = context.current()
    claimed = ""
    if req is not None:
        claimed = req.principal.subject if req.principal else str(req.extra.get("subject", ""))
    logger.warning(
        "call refused",
        extra={
            "event": "authz_denied",
            "grpc_code": error.grpc_status.name,
            "error_code": error.code,
            "reason": error.message,
            "rpc_service": service,
            "rpc_method": method,
            # Who the token said the caller was, when it was valid but not allowed; empty when
            # there was no valid token.
            "subject": claimed,
            "peer": peer,
        },
    )
