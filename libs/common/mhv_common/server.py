"""Running a service: gRPC server, health, reflection, /metrics, workers, graceful shutdown.

Shutdown runs in a fixed order so that no request or job is cut off half-way:

1. health goes NOT_SERVING (load balancers stop sending new calls), and the door closes: a new
   call is refused with MHV-016 (UNAVAILABLE, RetryInfo), one the caller may send elsewhere
   (`mhv_common.admission`);
2. calls in progress get `shutdown_grace_seconds` to finish, then the server stops;
3. background workers are asked to stop and drained;
4. connection pools close.

A service stopped this way exits with status 0; one that cannot drain in time still exits,
with the calls left over cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from prometheus_client import disable_created_metrics, start_http_server

from mhv_common import logs, processes, tracing
from mhv_common.admission import Admission
from mhv_common.auth import TokenVerifier
from mhv_common.config import CommonSettings, load_settings
from mhv_common.db import Database
from mhv_common.errors import MahavishnuError
from mhv_common.interceptors import MethodPolicy, build_interceptors
from mhv_common.probes import start_probe_listener
from mhv_common.ratelimit import RateLimiter
from mhv_common.revocation import Revocation
from mhv_common.tls import server_credentials

logger = logging.getLogger(__name__)

Listener = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""A server run beside gRPC (the webhook HTTPS edge): serves until the event is set."""
SettingsT = TypeVar("SettingsT", bound=CommonSettings)

# `*_created` series double the exposition size and nothing here queries them.
disable_created_metrics()


class _Reflection(ReflectionServicer):  # type: ignore[misc]
    """Server reflection that also resolves method symbols.

    The upb descriptor pool does not find ``pkg.Service.Method``, so ``grpcurl describe`` on a
    method failed; a method lives in its service's file, so we answer with that.
    """

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        response = super()._file_containing_symbol(request, fully_qualified_name)
        parent = fully_qualified_name.rpartition(".")[0]
        if response.HasField("error_response") and parent in self._service_names:
            return super()._file_containing_symbol(request, parent)
        return response


class Worker(Protocol):
    """A background job owned by a service (outbox relay, webhook workers, ...)."""

    name: str

    async def run(self) -> None:
        """Work until `stop` is called; return promptly after."""

    def stop(self) -> None:
        """Ask `run` to finish its current unit of work and return."""


@dataclass
class ServiceDefinition:
    """Everything a service contributes to the common runtime.

    Attributes:
        name: Short service name (``task``, ``audit``, ``webhook``), used in logs and metrics.
        grpc_port: Port of the gRPC listener (0 picks a free one).
        metrics_port: Port of the Prometheus /metrics listener (0 picks a free one; None: off).
        register: Adds the servicers to the server and returns their full service names.
        policies: Access, rate and deadline policy for every RPC the service serves.
        startup: Runs before the server accepts calls (open pools, load config).
        cleanup: Runs last, after workers stopped (close pools).
        workers: Background jobs started after startup and drained on shutdown.
        listeners: Servers run beside gRPC (`Listener`), by `serve_forever` only; each stops
            after health turns NOT_SERVING, like the gRPC listener.
        processes: Copies of the service sharing its ports (``MHV_<SERVICE>_PROCESSES``), run
            by `run_service` under a supervisor (`mhv_common.processes`).
        databases: Pools the service cannot serve without: while one cannot reach its
            database, health (readiness) says NOT_SERVING, and SERVING again once it can.
        revocation: How the edge learns that a person's user is still active
            (`mhv_common.revocation`); every service has one.
    """

    name: str
    grpc_port: int
    metrics_port: int | None
    register: Callable[[aio.Server], Sequence[str]]
    policies: Mapping[str, MethodPolicy]
    revocation: Revocation
    startup: Callable[[], Awaitable[None]] | None = None
    cleanup: Callable[[], Awaitable[None]] | None = None
    workers: list[Worker] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    processes: int = 1
    databases: Sequence[Database] = ()


# How often readiness asks each database, while reachable and while not; how long one ask may
# take. A restarted PostgreSQL is seen within about a second of accepting connections.
READINESS_INTERVAL_SECONDS = 1.0
READINESS_RETRY_SECONDS = 0.25
READINESS_TIMEOUT_SECONDS = 2.0


class RunningService:
    """A started service; `stop` shuts it down in order."""

    def __init__(self, definition: ServiceDefinition, settings: CommonSettings) -> None:
        self.definition = definition
        self.settings = settings
        self.health = HealthServicer()
        self.server: aio.Server | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.health_port = 0
        # False once a background worker died: the `liveness` probe then asks for a restart.
        self.alive = True
        self._probe_server: aio.Server | None = None
        self._metrics_server: WSGIServer | None = None
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._readiness_task: asyncio.Task[None] | None = None
        self._service_names: list[str] = []
        self._stopped = asyncio.Event()
        self._limiter: RateLimiter | None = None
        self.interceptors: list[aio.ServerInterceptor] = []
        self.admission = Admission(
            service=definition.name, listener="grpc", max_in_flight=settings.max_in_flight
        )

    async def start(self) -> None:
        """Run startup, bind the listeners and start workers; health turns SERVING."""
        d, s = self.definition, self.settings
        # Transport settings are checked before anything opens: a refused start leaves nothing.
        tls = server_credentials(s)
        tracing.configure(f"mahavishnu-{d.name}")
        verifier = TokenVerifier.from_sources(
            jwks_json=s.auth_jwks,
            jwks_file=s.auth_jwks_file,
            issuer=s.auth_issuer,
            audience=s.auth_audience,
            max_lifetime=s.auth_max_token_lifetime_seconds,
            max_service_lifetime=s.auth_max_service_token_lifetime_seconds,
        )
        limiter = RateLimiter(
            s.effective_rate_limits(),
            storage_uri=s.rate_limit_storage_uri,
            service=d.name,
            fail_closed=s.rate_limit_fail_closed,
        )
        self._limiter = limiter
        if d.startup is not None:
            await d.startup()
        self.interceptors = build_interceptors(
            verifier=verifier,
            limiter=limiter,
            policies=d.policies,
            admission=self.admission,
            revocation=d.revocation,
        )
        options: list[tuple[str, int]] = [
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            # GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS: a connection that never completes its
            # handshake (not even a ClientHello) is closed then, not after grpc's 120 s.
            ("grpc.server_handshake_timeout_ms", int(s.grpc_handshake_timeout_seconds * 1000)),
        ]
        if s.grpc_max_connection_age_seconds > 0:
            # A connection past its age takes no new calls; those in flight may run to their
            # longest deadline (a chain verification: minutes) before it is closed.
            longest = max([p.max_deadline for p in d.policies.values()], default=0.0)
            grace = max(longest, s.shutdown_grace_seconds)
            options += [
                ("grpc.max_connection_age_ms", int(s.grpc_max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", int(grace * 1000)),
            ]
        server = aio.server(interceptors=self.interceptors, options=options)
        self._service_names = list(d.register(server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            _Reflection(
                [
                    *self._service_names,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ]
            ),
            server,
        )
        address = f"{s.bind_host}:{d.grpc_port}"
        if tls is None:
            self.grpc_port = server.add_insecure_port(address)
        else:
            self.grpc_port = server.add_secure_port(address, tls)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC port {d.grpc_port}")
        await server.start()
        self.server = server
        if d.metrics_port is not None:
            http_server, _thread = start_http_server(d.metrics_port, addr=s.metrics_host)
            self._metrics_server = http_server
            self.metrics_port = http_server.server_port
        for worker in d.workers:
            self._worker_tasks.append(
                asyncio.create_task(self._run_worker(worker), name=f"{d.name}-{worker.name}")
            )
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if d.databases:
            self._readiness_task = asyncio.create_task(
                self._watch_databases(d.databases), name=f"{d.name}-readiness"
            )
        if s.health_port is not None:
            self._probe_server, self.health_port = await start_probe_listener(
                self.health, host=s.bind_host, port=s.health_port, alive=lambda: self.alive
            )
        logger.info(
            "service started",
            extra={
                "grpc_port": self.grpc_port,
                "grpc_tls": tls is not None,
                "metrics_port": self.metrics_port,
                "pid": os.getpid(),
            },
        )

    async def _run_worker(self, worker: Worker) -> None:
        try:
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A dead worker leaves work undone: make it loud, and flip health so the
            # orchestrator restarts this replica.
            logger.exception("worker crashed", extra={"worker": worker.name})
            self.alive = False
            await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)

    async def drain(self) -> None:
        """Health NOT_SERVING and refuse new calls (MHV-016); calls in progress go on."""
        await self.health.enter_graceful_shutdown()
        self.admission.drain()

    async def _watch_databases(self, databases: Sequence[Database]) -> None:
        """Keep health in step with the databases: NOT_SERVING while one is unreachable.

        Calls still get their answer meanwhile (MHV-002, retryable); readiness only tells load
        balancers and probes to prefer replicas that can serve. Liveness is untouched: waiting
        for a database is no reason to restart the process.
        """
        ready = True
        while not self._stopped.is_set():
            answers = await asyncio.gather(
                *(db.reachable(timeout=READINESS_TIMEOUT_SECONDS) for db in databases),
                return_exceptions=True,
            )
            reachable = all(answer is True for answer in answers)
            # A dead worker keeps health NOT_SERVING; shutdown's status is final (the health
            # servicer ignores changes after enter_graceful_shutdown).
            if reachable != ready and self.alive and not self._stopped.is_set():
                ready = reachable
                status = health_pb2.HealthCheckResponse.SERVING
                if not ready:
                    status = health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ["", *self._service_names]:
                    await self.health.set(name, status)
                if ready:
                    logger.info("database reachable again; serving")
                else:
                    logger.warning("database unreachable; health NOT_SERVING")
            await asyncio.sleep(READINESS_INTERVAL_SECONDS if ready else READINESS_RETRY_SECONDS)

    async def stop(self) -> None:
        """Shut down in order: health and door, calls in progress (with grace), workers, pools."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_seconds
        loop = asyncio.get_running_loop()
        began = loop.time()
        await self.drain()
        if self._readiness_task is not None:
            self._readiness_task.cancel()
            await asyncio.gather(self._readiness_task, return_exceptions=True)
        # The listener stays open while calls finish, so a late caller hears MHV-016 (retry
        # elsewhere) rather than a refused connection.
        await self.admission.idle(timeout=grace)
        if self.server is not None:
            await self.server.stop(max(grace - (loop.time() - began), 0.0))
        for worker in self.definition.workers:
            worker.stop()
        if self._worker_tasks:
            _done, pending = await asyncio.wait(self._worker_tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.definition.cleanup is not None:
            await self.definition.cleanup()
        if self._limiter is not None:
            await self._limiter.close()
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        # Last: probes see NOT_SERVING (not a refused connection) for the whole drain.
        if self._probe_server is not None:
            await self._probe_server.stop(None)
        logger.info("service stopped")


def refuse_start(service: str, error: MahavishnuError) -> NoReturn:
    """Log why `service` will not start (one line, no traceback) and exit with status 1."""
    logs.configure(f"mahavishnu-{service}")
    logger.error("service not started", extra={"error_code": error.code, "reason": error.message})
    raise SystemExit(1)


async def serve_forever(definition: ServiceDefinition, settings: CommonSettings) -> None:
    """Start the service, run until SIGTERM or SIGINT, then stop it cleanly.

    The definition's `listeners` run beside gRPC; each receives the stop event and must return
    after it is set. One that ends before the stop event (it crashed, or lost its listener)
    stops the whole service, which then exits with status 1: a process serving only half its
    listeners must not look healthy.

    Args:
        definition: The service.
        settings: Its settings.
    """
    logs.configure(
        f"mahavishnu-{definition.name}", level=settings.log_level, fmt=settings.log_format
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = RunningService(definition, settings)
    try:
        await running.start()
    except MahavishnuError as exc:
        refuse_start(definition.name, exc)
    # The extra listeners stop only after health says NOT_SERVING, like the gRPC listener.
    stop_extras = asyncio.Event()
    extra_tasks = [asyncio.create_task(run(stop_extras)) for run in definition.listeners]
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait([stop_wait, *extra_tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = not stop.is_set()
    if failed:
        for task in extra_tasks:
            if task.done():
                error = None if task.cancelled() else task.exception()
                logger.error("a listener stopped unexpectedly; stopping", exc_info=error)
        stop.set()
    await stop_wait
    logger.info("shutdown requested")
    await running.drain()
    stop_extras.set()
    if extra_tasks:
        await asyncio.gather(*extra_tasks, return_exceptions=True)
    await running.stop()
    # The process is ending: flush spans still waiting for export.
    tracing.shutdown()
    if failed:
        raise SystemExit(1)


def run_service(
    name: str, settings_type: type[SettingsT], build: Callable[[SettingsT], ServiceDefinition]
) -> None:
    """A service's ``main()``: load its settings, build it, serve until SIGTERM or SIGINT.

    A configuration error (environment, settings files, secrets, TLS material) is one log line
    without a traceback and exit status 1, before anything starts. With
    ``definition.processes`` above 1 this process supervises that many copies of itself
    (`mhv_common.processes`), which serve; the copies run the service with the supervisor
    serving their metrics.

    Args:
        name: Short service name, for the refusal's log line.
        settings_type: The service's settings class, read from the environment.
        build: Assembles the service from its settings; raises `MahavishnuError` (MHV-001) for
            configuration it cannot use.
    """
    try:
        settings = load_settings(settings_type)
        definition = build(settings)
        processes.check(name, processes=definition.processes, grpc_port=definition.grpc_port)
    except MahavishnuError as exc:
        refuse_start(name, exc)
    if processes.child_index() is not None:
        # One of several copies: the supervisor serves the metrics of all.
        processes.follow_supervisor()
        definition = replace(definition, metrics_port=None)
    elif definition.processes > 1:
        raise SystemExit(
            processes.supervise(
                name,
                processes=definition.processes,
                metrics_port=definition.metrics_port,
                settings=settings,
            )
        )
    asyncio.run(serve_forever(definition, settings))
