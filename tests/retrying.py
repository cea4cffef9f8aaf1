"""Test clients that behave as real senders do: a shed request is sent again after the delay
the server advised, and only then.

A service under more load than it can serve refuses some requests with a retryable answer
(gRPC UNAVAILABLE or RESOURCE_EXHAUSTED carrying ``RetryInfo``, HTTP 503 or 429 carrying
``Retry-After``) rather than queueing them without bound. A load test that counts those
answers as failures tests the machine's speed, not the service; one that retries them the way
the error catalog's recovery guidance says keeps asserting what matters: what was finally
answered, and what was stored.

Anything else (another status, a refusal without advice, a transport failure) is not retried:
it reaches the test as it happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import httpx
from grpc import aio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
)

from mhv_common.errors import from_rpc_error

T = TypeVar("T")

# How long one request keeps being sent again, in all. Generous: the suite runs on busy
# machines, and a request that is still shed after this long is a failure worth seeing.
RETRY_BUDGET_SECONDS = 120.0
# Longest single wait honoured, so a wrong advice cannot stall a test for its whole budget.
LONGEST_ADVISED_WAIT_SECONDS = 10.0
_SHED_GRPC = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_SHED_HTTP = (429, 503)


def advised_rpc_delay(error: BaseException) -> float | None:
    """The RetryInfo delay of a shed gRPC call, or None when `error` is not one."""
    if not isinstance(error, aio.AioRpcError) or error.code() not in _SHED_GRPC:
        return None
    typed = from_rpc_error(error)
    return None if typed is None else typed.retry_after


def advised_http_delay(response: httpx.Response) -> float | None:
    """The Retry-After delay (in seconds) of a shed HTTP answer, or None for any other."""
    if response.status_code not in _SHED_HTTP:
        return None
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _wait(advice: Callable[[RetryCallState], float | None]) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        return min(advice(state) or 0.0, LONGEST_ADVISED_WAIT_SECONDS)

    return wait


def _rpc_advice(state: RetryCallState) -> float | None:
    assert state.outcome is not None
    return advised_rpc_delay(state.outcome.exception())  # type: ignore[arg-type]


def _http_advice(state: RetryCallState) -> float | None:
    assert state.outcome is not None
    return advised_http_delay(state.outcome.result())


async def rpc(
    method: Callable[..., Awaitable[T]],
    request: object,
    *,
    budget: float = RETRY_BUDGET_SECONDS,
    **options: object,
) -> T:
    """Call `method` (a stub's method) with `request`, again after each shed answer's delay.

    The request must be safe to repeat after a shed answer (a shed call did nothing); requests
    that create carry a request id anyway, so a repeat is recognised whatever happened.
    `options` (metadata, timeout) go to every attempt.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception(lambda e: advised_rpc_delay(e) is not None),
        wait=_wait(_rpc_advice),
        stop=stop_after_delay(budget),
        reraise=True,
    )

    async def attempt() -> T:
        # A stub's method returns a call object to await, not a coroutine.
        return await method(request, **options)

    result: T = await retrying(attempt)
    return result


async def post(
    client: httpx.AsyncClient,
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    budget: float = RETRY_BUDGET_SECONDS,
) -> httpx.Response:
    """POST like a webhook sender: again after each 503/429's Retry-After; the last answer.

    Only a shed answer is sent again; when the budget is spent the shed answer is returned,
    for the test to see.
    """
    retrying = AsyncRetrying(
        retry=retry_if_result(lambda r: advised_http_delay(r) is not None),
        wait=_wait(_http_advice),
        stop=stop_after_delay(budget),
        retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
    )
    response: httpx.Response = await retrying(client.post, url, content=content, headers=headers)
    return response
