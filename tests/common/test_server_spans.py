"""The gRPC edge's server span: in the caller's trace, named and labelled as OpenTelemetry's
gRPC instrumentation names them, with the status the caller receives."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from mhv_common.auth import Role
from mhv_common.config import CommonSettings
from mhv_common.errors import TaskNotFoundError
from mhv_common.interceptors import MethodPolicy
from mhv_common.server import RunningService, ServiceDefinition
from tests.harness import Keys, anyone_active, bearer

SERVICE = "mhvtest.Spans"
ANYONE = frozenset({Role.ADMIN, Role.MEMBER})


async def _echo(request: bytes, _ctx: Any) -> bytes:
    return request


async def _missing(_request: bytes, _ctx: Any) -> bytes:
    raise TaskNotFoundError()


async def _boom(_request: bytes, _ctx: Any) -> bytes:
    raise RuntimeError("internal detail")


def _register(server: aio.Server) -> Sequence[str]:
    handlers = {"Echo": _echo, "Missing": _missing, "Boom": _boom}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {k: grpc.unary_unary_rpc_method_handler(v) for k, v in handlers.items()}
            ),
        )
    )
    return [SERVICE]


@pytest.fixture(scope="module")
async def spans(keys: Keys) -> AsyncIterator[tuple[RunningService, InMemorySpanExporter]]:
    running = RunningService(
        ServiceDefinition(
            name="spans",
            grpc_port=0,
            metrics_port=None,
            register=_register,
            policies={f"/{SERVICE}/{m}": MethodPolicy(ANYONE) for m in ("Echo", "Missing", "Boom")},
            revocation=anyone_active(),
        ),
        CommonSettings(auth_jwks_file=keys.jwks, shutdown_grace_seconds=1),
    )
    await running.start()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield running, exporter
    # A stopped exporter keeps nothing of the spans that later tests make.
    exporter.shutdown()
    await running.stop()


async def test_server_spans_join_the_callers_trace_with_the_final_status(
    spans: tuple[RunningService, InMemorySpanExporter], keys: Keys
) -> None:
    running, exporter = spans
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    calls = {"Echo": grpc.StatusCode.OK, "Missing": grpc.StatusCode.NOT_FOUND}
    calls["Boom"] = grpc.StatusCode.INTERNAL
    async with aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
        for name, expected in calls.items():
            metadata = (
                *bearer(keys.token(Role.MEMBER)),
                ("traceparent", f"00-{trace_id}-{parent_id}-01"),
            )
            try:
                await channel.unary_unary(f"/{SERVICE}/{name}")(b"x", metadata=metadata)
                code = grpc.StatusCode.OK
            except aio.AioRpcError as error:
                code = error.code()
            assert code == expected
    mine = {
        s.name: s for s in exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
    }
    assert set(mine) == {f"/{SERVICE}/{name}" for name in calls}
    for name, expected in calls.items():
        span = mine[f"/{SERVICE}/{name}"]
        assert span.kind == SpanKind.SERVER
        assert span.parent is not None and f"{span.parent.span_id:016x}" == parent_id
        assert span.attributes is not None
        assert dict(span.attributes) == {
            "rpc.system": "grpc",
            "rpc.service": SERVICE,
            "rpc.method": name,
            "rpc.grpc.status_code": expected.value[0],
        }
    # The service's own faults mark the span as an error; the caller's (not found) do not.
    assert mine[f"/{SERVICE}/Boom"].status.status_code == StatusCode.ERROR
    assert mine[f"/{SERVICE}/Missing"].status.status_code == StatusCode.UNSET
    assert mine[f"/{SERVICE}/Echo"].status.status_code == StatusCode.UNSET
