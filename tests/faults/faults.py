"""The faults the drills inject into a running system, and what they observe meanwhile.

Each returns a `tests.cluster.drill.Fault` for `run_fault`: PostgreSQL stopped (``fast`` or
``immediate``) and started again, its backends terminated, one service SIGKILLed and restarted,
the audit service kept down. PostgreSQL is always the run's private cluster: restarting a
server others use is out of the question.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import grpc
import httpx
from google.rpc import error_details_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.client import service_channel
from tests.cluster.drill import CALL_TIMEOUT, Fault, issue_opened
from tests.cluster.system import Replica, System
from tests.harness import bearer, detail, mhv_code, rich_status

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(replica: Replica) -> int | None:
    """The replica's readiness (its health for ``""``), None when it does not answer."""
    async with service_channel(replica.peer) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2.0
            )
        except grpc.RpcError:
            return None
        return int(reply.status)


async def wait_health(replicas: list[Replica], status: int, *, timeout: float = 60.0) -> None:
    """Wait until every one of `replicas` reports `status`."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [await health(r) for r in replicas]
        if all(s == status for s in seen):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"health {seen}, waited for {status}")
        await asyncio.sleep(0.1)


@dataclass
class Outage:
    """What the drill saw while the database was away."""

    not_serving: list[str] = field(default_factory=list)  # replicas seen NOT_SERVING
    # CreateTask during the outage: status, MHV code, RetryInfo delay in seconds (or None)
    answers: list[tuple[str, str, float | None]] = field(default_factory=list)
    # A webhook delivery during the outage: HTTP status, MHV code, Retry-After (or None)
    deliveries: list[tuple[int, str, str | None]] = field(default_factory=list)


async def create_during_outage(system: System) -> tuple[str, str, float | None]:
    """One CreateTask while the database is away: its status, MHV code and retry delay."""
    request_id = str(uuid.uuid4())
    async with service_channel(system.peer("task")) as channel:
        try:
            await task_pb2_grpc.TaskServiceStub(channel).CreateTask(
                task_pb2.CreateTaskRequest(
                    title=f"outage probe {request_id}", repository="demo", request_id=request_id
                ),
                metadata=bearer(system.token("admin")),
                timeout=CALL_TIMEOUT,
            )
        except aio.AioRpcError as exc:
            retry = detail(rich_status(exc), error_details_pb2.RetryInfo)
            delay = retry.retry_delay.ToTimedelta().total_seconds() if retry else None
            return exc.code().name, mhv_code(exc), delay
    return "OK", "", None


async def deliver_during_outage(system: System) -> tuple[int, str, str | None]:
    """One webhook delivery while the database is away: status, MHV code, Retry-After."""
    secret = system.hooks["MHV_WEBHOOK_SECRETS_GITHUB"]
    context = ssl.create_default_context(cafile=system.hooks["MHV_WEBHOOK_TLS_CERT_FILE"])
    body, headers = issue_opened(secret, 0, str(uuid.uuid4()))
    async with httpx.AsyncClient(verify=context, timeout=CALL_TIMEOUT) as client:
        response = await client.post(
            system.https_urls()[0],
            content=body,
            headers=headers,
            extensions={"sni_hostname": "localhost"},
        )
    code = str(response.json().get("error_code", "")) if response.content else ""
    return response.status_code, code, response.headers.get("retry-after")


def postgres_restart(system: System, *, mode: str, seen: Outage) -> Fault:
    """PostgreSQL stopped with ``pg_ctl -m <mode>`` and started again.

    While it is down, every replica must say NOT_SERVING, and a CreateTask must be refused
    with UNAVAILABLE, MHV-002 and a retry delay, and a webhook delivery with 503, MHV-002 and
    Retry-After; after, every replica SERVING again.
    """
    postgres = system.postgres
    assert postgres is not None

    async def stop() -> None:
        await asyncio.to_thread(postgres.stop, mode=mode)

    async def start() -> None:
        await asyncio.to_thread(postgres.start)

    async def observe() -> None:
        await wait_health(system.replicas, NOT_SERVING)
        seen.not_serving = [r.target for r in system.replicas]
        seen.answers.append(await create_during_outage(system))
        seen.deliveries.append(await deliver_during_outage(system))

    async def serving() -> None:
        await wait_health(system.replicas, SERVING)

    return Fault(
        f"PostgreSQL restart (-m {mode})",
        stop,
        start,
        system.replicas,
        during=observe,
        after_repair=serving,
    )


def backends_terminated(system: System, *, rounds: int, every: float) -> Fault:
    """Every backend of the services' roles ended by ``pg_terminate_backend``, `rounds` times."""

    async def terminate() -> None:
        conn = await asyncpg.connect(system.admin_url)
        try:
            for _ in range(rounds):
                await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND application_name LIKE 'mahavishnu-%'"
                )
                await asyncio.sleep(every)
        finally:
            await conn.close()

    async def nothing() -> None:
        return None

    return Fault("backends terminated", terminate, nothing, system.replicas)


def killed(system: System, service: str, *, down: Callable[[], None] | None = None) -> Fault:
    """SIGKILL of `service`'s replica from outside, and a restart."""
    (replica,) = system.replicas_of(service)

    async def kill() -> None:
        replica.kill()
        if down is not None:
            down()

    async def restart() -> None:
        await replica.start()

    return Fault(f"SIGKILL of the {service} service", kill, restart, [replica])


@dataclass
class Backlog:
    """The outbox as the task service reported it while the audit service was down."""

    samples: list[tuple[float, float]] = field(default_factory=list)  # (depth, lag seconds)
    # (seconds into the outage, sessions of the task service holding claimed outbox rows in
    # an open transaction): a relay waiting for the audit service inside its transaction
    held: list[tuple[float, int]] = field(default_factory=list)

    def peak(self) -> tuple[float, float]:
        """The largest depth and lag seen."""
        return max(d for d, _ in self.samples), max(lag for _, lag in self.samples)


def audit_down(system: System, backlog: Backlog, *, seconds: float) -> Fault:
    """The audit service SIGKILLed and kept down; recovered once the outbox has caught up.

    While it is down, `backlog` samples every second the gauges the TaskOutboxBacklog alert
    reads, and whether the relay holds claimed rows in an open transaction.
    """
    (task,) = system.replicas_of("task")

    async def sample() -> None:
        backlog.samples.clear()
        backlog.held.clear()
        began = time.monotonic()
        conn = await asyncpg.connect(system.admin_url)
        try:
            while time.monotonic() < began + seconds:
                depth = await task.metric("task_outbox_depth")
                lag = await task.metric("task_outbox_lag_seconds")
                backlog.samples.append((depth, lag))
                held = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database()"
                    " AND application_name = 'mahavishnu-task'"
                    " AND state LIKE 'idle in transaction%' AND query LIKE '%WITH claimed AS%'"
                )
                backlog.held.append((time.monotonic() - began, int(held)))
                await asyncio.sleep(1.0)
        finally:
            await conn.close()

    async def caught_up() -> None:
        # The oldest undelivered event is young again (the gauges refresh every 2 s).
        while True:
            if await task.metric("task_outbox_lag_seconds") <= 2.0:
                return
            await asyncio.sleep(0.2)

    return dataclasses.replace(
        killed(system, "audit"), name="audit service down", during=sample, after_repair=caught_up
    )


def all_alive(system: System) -> dict[str, int | None]:
    """Exit status of every replica's process (None: still running)."""
    return {
        f"{r.service}@{r.host.name}": (r.process.poll() if r.process else -1)
        for r in system.replicas
    }
