"""What the edges share: error mapping, header names, and which statuses are whose fault.

`classify` decides which catalog error a caller receives for any exception, so both edges (and
the metrics and log lines of both) report the same code for the same failure. The metadata
keys are the same on gRPC metadata and HTTP headers.
"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
from grpc import aio

from mhv_common.db import is_connection_error
from mhv_common.errors import (
    DatabaseConnectionError,
    DeadlineExceededError,
    InternalError,
    MahavishnuError,
    NotImplementedRpcError,
    RequestCancelledError,
    ServiceUnavailableError,
)

REQUEST_ID_KEY = "x-request-id"
"""The caller's request id (taken when sent, else generated), echoed back on every answer."""

ON_BEHALF_OF_KEY = "x-mhv-on-behalf-of"
"""The user a service caller acts for; only service principals may send it."""

_S = grpc.StatusCode

SERVICE_FAULTS = frozenset(
    {_S.INTERNAL, _S.UNAVAILABLE, _S.DEADLINE_EXCEEDED, _S.UNKNOWN, _S.DATA_LOSS}
)
"""Statuses that blame the answering service, not the caller (its metrics count them as errors)."""

TRANSIENT_STATUSES = (SERVICE_FAULTS - {_S.DATA_LOSS}) | {_S.RESOURCE_EXHAUSTED, _S.CANCELLED}
"""Statuses after which the same call may succeed later: a caller retries these.

The service's faults that pass (an outage, a missed deadline, a crash), and two that are not
its fault but pass too: a rate limit (RESOURCE_EXHAUSTED) and a call cut short (CANCELLED).
Lost data does not come back by asking again.
"""


def classify(exc: BaseException) -> MahavishnuError:
    """Map any exception to the error the caller will see. Never exposes the exception's text."""
    if isinstance(exc, MahavishnuError):
        return exc
    if isinstance(exc, TimeoutError | asyncpg.exceptions.QueryCanceledError):
        return DeadlineExceededError()
    if isinstance(exc, asyncio.CancelledError):
        return RequestCancelledError()
    if isinstance(exc, NotImplementedError):
        # The generated servicer base classes raise this for RPCs a service does not serve.
        return NotImplementedRpcError()
    if is_connection_error(exc):
        return DatabaseConnectionError(retry_after=1.0)
    if isinstance(exc, aio.AioRpcError):
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError()
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return ServiceUnavailableError(retry_after=1.0)
    return InternalError()


__all__ = [
    "ON_BEHALF_OF_KEY",
    "REQUEST_ID_KEY",
    "SERVICE_FAULTS",
    "TRANSIENT_STATUSES",
    "classify",
]
