"""The plaintext probe listener: readiness and liveness for the kubelet's native gRPC probes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mhv_common.config import CommonSettings
from mhv_common.probes import LIVENESS
from mhv_common.server import RunningService, ServiceDefinition
from tests.harness import Keys, anyone_active

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CrashOnDemand:
    """A background worker that raises when told to."""

    name = "crash-on-demand"

    def __init__(self) -> None:
        self.crash = asyncio.Event()
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        done = asyncio.ensure_future(self.stopped.wait())
        crash = asyncio.ensure_future(self.crash.wait())
        await asyncio.wait([done, crash], return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        crash.cancel()
        if self.crash.is_set():
            raise RuntimeError("worker lost its way")

    def stop(self) -> None:
        self.stopped.set()


async def check(port: int, service: str) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def start(keys: Keys, worker: CrashOnDemand) -> RunningService:
    settings = CommonSettings(auth_jwks_file=keys.jwks, health_port=0, shutdown_grace_seconds=1)
    definition = ServiceDefinition(
        name="probed",
        grpc_port=0,
        metrics_port=None,
        register=lambda server: [],
        policies={},
        revocation=anyone_active(),
        workers=[worker],
    )
    running = RunningService(definition, settings)
    await running.start()
    return running


async def test_readiness_and_liveness_answer_in_plaintext_on_their_own_port(keys: Keys) -> None:
    worker = CrashOnDemand()
    running = await start(keys, worker)
    try:
        assert running.health_port not in (0, running.grpc_port)
        assert await check(running.health_port, "") == SERVING
        assert await check(running.health_port, LIVENESS) == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            await check(running.health_port, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # Health only: reflection (served on the service port) is not reachable here.
        async with aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as other:
                async for _ in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                ):
                    pass
            assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.stop()


async def test_a_dead_worker_fails_liveness_and_readiness(keys: Keys) -> None:
    worker = CrashOnDemand()
    running = await start(keys, worker)
    try:
        worker.crash.set()
        for _ in range(100):
            if await check(running.health_port, LIVENESS) == NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert await check(running.health_port, LIVENESS) == NOT_SERVING
        assert await check(running.health_port, "") == NOT_SERVING
    finally:
        await running.stop()


async def test_draining_fails_readiness_but_not_liveness(keys: Keys) -> None:
    worker = CrashOnDemand()
    running = await start(keys, worker)
    try:
        await running.health.enter_graceful_shutdown()
        assert await check(running.health_port, "") == NOT_SERVING
        # A draining replica must finish its calls, not be killed by its liveness probe.
        assert await check(running.health_port, LIVENESS) == SERVING
    finally:
        await running.stop()
