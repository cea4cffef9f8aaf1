"""The task service with one concern taken out, for `bench.create_task --breakdown`.

    BENCH_WITHOUT=tracing python -m bench._task_variant

Runs the task service exactly as ``python -m mhv_task`` does, after replacing the one concern
named by ``BENCH_WITHOUT`` with nothing (or with the least that lets a call through), so that
the difference against the full service, measured in the same run, is what that concern costs
per call. Benchmarks only: the service itself has no switch to turn a concern off.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from grpc import aio

from mhv_common import context, db, interceptors, server
from mhv_common.auth import Principal, Role

CONCERNS: dict[str, str] = {
    "tracing": "OpenTelemetry server span (interceptor removed)",
    "access_log": "access log line at INFO (logger silenced)",
    "metrics": "RPC and CreateTask metrics (series replaced by no-ops)",
    "deadline": "deadline interceptor (removed)",
    "auth": "token check and role gate (principal set without checking)",
    "rate_limit": "rate-limit interceptor (removed)",
    "pool": "deadline-bound acquire and shielded release (bare asyncpg pool)",
    "chain": "every interceptor (one layer binds the request context only)",
}
"""Each concern `BENCH_WITHOUT` may name, and what its variant takes out."""


class _NoMetric:
    """Stands for a Prometheus metric and its children; records nothing."""

    def labels(self, *_args: Any, **_kwargs: Any) -> _NoMetric:
        return self

    def inc(self, *_args: Any) -> None:
        pass

    def observe(self, *_args: Any) -> None:
        pass


def _principal() -> Principal:
    # The bench's caller: the subject is the user its token names.
    return Principal(subject=os.environ["BENCH_SUBJECT"], roles=frozenset({Role.MEMBER}))


class _ContextOnly(interceptors.EdgeInterceptor):
    """Binds the request context with the bench's caller; no other concern."""

    async def intercept(
        self, method: Callable[..., Any], request: Any, ctx: aio.ServicerContext, name: str
    ) -> Any:
        req = context.RequestContext(request_id="bench", method=name, principal=_principal())
        with context.bind(req):
            return await self._call(method, request, ctx)


def _without(kind: type) -> Callable[..., list[Any]]:
    build = interceptors.build_interceptors

    def without(**kwargs: Any) -> list[Any]:
        return [i for i in build(**kwargs) if not isinstance(i, kind)]

    return without


def _apply(concern: str) -> None:
    if concern == "tracing":
        server.build_interceptors = _without(interceptors.OpenTelemetryInterceptor)
    elif concern == "access_log":
        logging.getLogger("mhv.access").setLevel(logging.WARNING)
    elif concern == "metrics":
        from mhv_task import _metrics

        for module, names in (
            (interceptors, ("GRPC_HANDLED", "GRPC_LATENCY", "GRPC_ERRORS")),
            (_metrics, ("TASK_CREATION_TOTAL", "TASK_CREATION_DURATION")),
        ):
            for name in names:
                setattr(module, name, _NoMetric())
    elif concern == "deadline":
        server.build_interceptors = _without(interceptors.DeadlineInterceptor)
    elif concern == "rate_limit":
        server.build_interceptors = _without(interceptors.RateLimitInterceptor)
    elif concern == "auth":

        async def trusting(
            self: interceptors.AuthInterceptor,
            method: Callable[..., Any],
            request: Any,
            ctx: aio.ServicerContext,
            name: str,
        ) -> Any:
            req = context.current()
            if req is not None:
                req.principal = _principal()
            return await self._call(method, request, ctx)

        interceptors.AuthInterceptor.intercept = trusting  # type: ignore[method-assign]
    elif concern == "pool":

        async def acquire(self: db.Database, _timeout: float | None) -> Any:
            return await self.pool.acquire()

        async def release(self: db.Database, conn: Any) -> None:
            await self.pool.release(conn)

        db.Database._acquire = acquire  # type: ignore[method-assign]
        db.Database._release = release  # type: ignore[method-assign]
        # No shield around the release, in this module only.
        db.asyncio = SimpleNamespace(  # type: ignore[assignment]
            **{**vars(asyncio), "shield": lambda awaitable: awaitable}
        )
    elif concern == "chain":
        server.build_interceptors = lambda **_kwargs: [_ContextOnly()]
    elif concern:
        raise SystemExit(f"BENCH_WITHOUT={concern!r}: one of {', '.join(CONCERNS)}")


def main() -> None:
    """Apply ``BENCH_WITHOUT`` and run the task service."""
    _apply(os.environ.get("BENCH_WITHOUT", ""))
    from mhv_task.app import main as task_main

    task_main()


if __name__ == "__main__":
    main()
