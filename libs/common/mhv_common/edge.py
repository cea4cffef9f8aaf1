"""What the gRPC interceptors and the HTTP middleware share: error mapping and header names.

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


__all__ = ["ON_BEHALF_OF_KEY", "REQUEST_ID_KEY", "classify"]
