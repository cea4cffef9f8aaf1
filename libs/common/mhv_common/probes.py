"""A plaintext listener for an orchestrator's probes: ``grpc.health.v1`` and nothing else.

The service port serves TLS only, and the kubelet's native gRPC probes speak plaintext without
credentials. With ``MHV_HEALTH_PORT`` set, a second listener answers health checks, and only
them, in plaintext:

- ``""`` and each service name: the service's own health. It goes NOT_SERVING first thing on
  shutdown, so it is the readiness signal.
- ``liveness``: SERVING while the process does its work; NOT_SERVING once a background worker
  died, which only a restart mends. It ignores readiness on purpose: a replica that is draining,
  or waiting for its database, must not be killed for it.

A health answer tells a caller nothing it could misuse, so this listener needs neither TLS nor
a token; every other RPC on it is UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

LIVENESS = "liveness"


class ProbeHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The service's health, plus ``liveness`` from `alive`."""

    def __init__(self, health: HealthServicer, *, alive: Callable[[], bool]) -> None:
        self._health = health
        self._alive = alive

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        """Answer ``liveness`` from `alive`, anything else from the service's health."""
        if request.service == LIVENESS:
            serving = health_pb2.HealthCheckResponse.SERVING
            status = serving if self._alive() else health_pb2.HealthCheckResponse.NOT_SERVING
            return health_pb2.HealthCheckResponse(status=status)
        return await self._health.Check(request, context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]
    ) -> None:
        """Stream the service's health (probes poll `Check`; this is for load balancers)."""
        await self._health.Watch(request, context)


async def start_probe_listener(
    health: HealthServicer, *, host: str, port: int, alive: Callable[[], bool]
) -> tuple[aio.Server, int]:
    """Start the plaintext health listener on `host`:`port` (0: a free port).

    Returns:
        The started server and the port it listens on.

    Raises:
        OSError: The port cannot be bound.

    """
    server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(ProbeHealth(health, alive=alive), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the health port {port}")
    await server.start()
    return server, bound
