"""Per-request state carried across awaits: request id, caller, deadline.

The gRPC edge fills a `RequestContext` for every call; code below it reads the remaining time
with `time_left()` and passes it as ``timeout=`` to every database and outbound call, so no
I/O outlives the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mhv_common.auth import Principal
from mhv_common.errors import DeadlineExceededError

# I/O started with less time than this left would fail anyway; refuse it up front.
_MIN_USEFUL_SECONDS = 0.001


@dataclass(slots=True)
class RequestContext:
    """What the edge knows about the call being served.

    Attributes:
        request_id: Correlates logs, metrics exemplars and audit records; taken from the
            caller's ``x-request-id`` metadata when present, else generated.
        method: Full gRPC method name or HTTP route.
        deadline: Absolute deadline on the `time.monotonic` clock, or None for none.
        principal: The authenticated caller, once authentication ran.
        error_code: The MHV code the call ended with, set by the error mapping.
        metadata: The call's metadata (lower-case keys, text values only).
        extra: Facts later layers add (e.g. the user a service acts for).
    """

    request_id: str
    method: str
    deadline: float | None = None
    principal: Principal | None = None
    error_code: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "mhv_request", default=None
)


def current() -> RequestContext | None:
    """Return the context of the call being served, if any."""
    return _current.get()


@contextmanager
def bind(ctx: RequestContext) -> Iterator[RequestContext]:
    """Make `ctx` the current request context for the enclosed block."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def time_left(default: float | None = None, *, cap: float | None = None) -> float | None:
    """Seconds until the current deadline, bounded by `cap`.

    Args:
        default: Returned when no request context or deadline is set.
        cap: An upper bound for this particular operation (e.g. a statement timeout).

    Returns:
        The time budget for the next I/O call, or None when there is no bound at all.

    Raises:
        DeadlineExceededError: The deadline has already passed.
    """
    ctx = _current.get()
    left: float | None = default
    if ctx is not None and ctx.deadline is not None:
        left = ctx.deadline - time.monotonic()
        if left < _MIN_USEFUL_SECONDS:
            raise DeadlineExceededError()
    if cap is not None:
        left = cap if left is None else min(left, cap)
    return left


@contextmanager
def deadline_scope(seconds: float | None) -> Iterator[None]:
    """Tighten the current deadline to at most `seconds` from now for the enclosed block.

    Background workers use this to give their own I/O a deadline the same way the edge does
    for requests.
    """
    ctx = _current.get()
    if seconds is None:
        yield
        return
    new_deadline = time.monotonic() + seconds
    if ctx is None:
        with bind(RequestContext(request_id="-", method="-", deadline=new_deadline)):
            yield
        return
    old = ctx.deadline
    ctx.deadline = new_deadline if old is None else min(old, new_deadline)
    try:
        yield
    finally:
        ctx.deadline = old


def asyncio_timeout() -> asyncio.Timeout:
    """An `asyncio.timeout` that expires at the current request deadline (or never)."""
    ctx = _current.get()
    if ctx is None or ctx.deadline is None:
        return asyncio.timeout(None)
    loop = asyncio.get_running_loop()
    return asyncio.timeout_at(loop.time() + (ctx.deadline - time.monotonic()))
