"""The outbox relay: every committed task change reaches the audit log exactly once, in order.

Each test runs its own deployment (database, task and audit processes), because it stops,
kills and multiplies processes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from tests import retrying
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    bearer,
    grpc_channel,
    metric,
    service_env,
    stop_all,
)
from tests.task.conftest import make_user
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@dataclass
class System:
    deployment: Deployment
    keys: Keys
    env: dict[str, str]
    logs: Path
    audit: ServiceProcess
    # The task service the audit service asks about people (mhv_common.revocation).
    directory: ServiceProcess
    tasks: list[ServiceProcess] = field(default_factory=list)
    user_id: str = ""
    auditor_id: str = ""

    def task_process(self, index: int) -> ServiceProcess:
        grpc_port, metrics_port = free_port(), free_port()
        env = {
            **self.env,
            "MHV_TASK_GRPC_PORT": str(grpc_port),
            "MHV_TASK_METRICS_PORT": str(metrics_port),
        }
        return ServiceProcess(
            "mhv_task",
            env,
            grpc_port,
            metrics_port,
            self.logs / f"task{index}-{time.monotonic_ns()}.log",
        )

    def token(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.keys.token(Role.MEMBER, subject=self.user_id))


@pytest.fixture
async def system(cluster: Cluster, keys: Keys, tmp_path: Path) -> AsyncIterator[System]:
    deployment = await Deployment.create(cluster)
    user_id = await make_user(deployment, "relay")
    auditor_id = await make_user(deployment, "auditor")
    audit_port, audit_metrics = free_port(), free_port()
    directory_port, directory_metrics = free_port(), free_port()
    # The relay reaches the audit service as in production: over TLS, checking its certificate.
    grpc_tls = DevState(tmp_path / "grpc-tls")
    grpc_tls.ensure_grpc_tls(("audit", "task"))
    env = service_env(
        deployment,
        keys,
        {
            "MHV_AUDIT_GRPC_PORT": str(audit_port),
            "MHV_AUDIT_METRICS_PORT": str(audit_metrics),
            "MHV_AUDIT_TARGET": f"127.0.0.1:{audit_port}",
            "MHV_RELAY_POLL_INTERVAL_SECONDS": "0.02",
            "MHV_LOG_LEVEL": "WARNING",
            "MHV_GRPC_TLS_CA_FILE": str(grpc_tls.grpc_ca),
        },
    )
    audit_env = {
        **env,
        "MHV_GRPC_TLS_CERT_FILE": str(grpc_tls.grpc_cert("audit")),
        "MHV_GRPC_TLS_KEY_FILE": str(grpc_tls.grpc_key("audit")),
        "MHV_TASK_TARGET": f"127.0.0.1:{directory_port}",
    }
    # A task service that relays nothing, answering the audit service's questions about people
    # whatever happens to the relaying processes under test.
    directory = ServiceProcess(
        "mhv_task",
        {
            **env,
            "MHV_TASK_GRPC_PORT": str(directory_port),
            "MHV_TASK_METRICS_PORT": str(directory_metrics),
            "MHV_RELAY_ENABLED": "false",
            "MHV_GRPC_TLS_CERT_FILE": str(grpc_tls.grpc_cert("task")),
            "MHV_GRPC_TLS_KEY_FILE": str(grpc_tls.grpc_key("task")),
        },
        directory_port,
        directory_metrics,
        tmp_path / "directory.log",
        ca_file=grpc_tls.grpc_ca,
    )
    audit = ServiceProcess(
        "mhv_audit",
        audit_env,
        audit_port,
        audit_metrics,
        tmp_path / "audit.log",
        ca_file=grpc_tls.grpc_ca,
    )
    running = System(
        deployment, keys, env, tmp_path, audit, directory, user_id=user_id, auditor_id=auditor_id
    )
    await directory.start()
    await audit.start()
    yield running
    try:
        stop_all([*running.tasks, audit, directory])
    finally:
        await deployment.drop()


async def drive(
    target: str, metadata: tuple[tuple[str, str], ...], *, tasks: int, concurrency: int = 16
) -> int:
    """Create tasks and move each through a few changes; return committed mutations."""
    done = 0
    async with aio.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(tasks):
            queue.put_nowait(i)

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                i = queue.get_nowait()
                # A busy machine sheds some calls (UNAVAILABLE, RetryInfo): like any client,
                # send them again after the advised delay. The request id makes a repeated
                # creation return the first task.
                create = task_pb2.CreateTaskRequest(
                    title=f"relay {i}", repository="demo", request_id=str(uuid.uuid4())
                )
                task = await retrying.rpc(stub.CreateTask, create, metadata=metadata, timeout=10)
                start = task_pb2.StartTaskRequest(id=task.id)
                await retrying.rpc(stub.StartTask, start, metadata=metadata, timeout=10)
                complete = task_pb2.CompleteTaskRequest(id=task.id)
                await retrying.rpc(stub.CompleteTask, complete, metadata=metadata, timeout=10)
                done += 3

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def _counts(deployment: Deployment) -> tuple[int, int, int]:
    """(outbox events, undelivered events, audit rows)."""
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM task.outbox) AS events,"
            " (SELECT count(*) FROM task.outbox WHERE delivered_at IS NULL) AS pending,"
            " (SELECT count(*) FROM audit.task_audit_log) AS audited"
        )
        return int(row["events"]), int(row["pending"]), int(row["audited"])
    finally:
        await conn.close()


async def wait_all_delivered(deployment: Deployment, *, timeout: float = 90) -> None:
    async def delivered() -> bool:
        events, pending, audited = await _counts(deployment)
        return pending == 0 and audited == events

    try:
        await wait_until(delivered, what="every event delivered", timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not delivered in time: {await _counts(deployment)}") from None


async def assert_exactly_once_in_order(system: System) -> None:
    conn = await asyncpg.connect(system.deployment.admin_url)
    try:
        outbox = await conn.fetch("SELECT event_id, task_id FROM task.outbox ORDER BY id")
        audit = await conn.fetch("SELECT event_id, task_id FROM audit.task_audit_log ORDER BY id")
    finally:
        await conn.close()
    assert len(audit) == len(outbox)
    assert {r["event_id"] for r in audit} == {r["event_id"] for r in outbox}
    # Per task, the audit log holds the events in the order they were committed.
    by_task_outbox: dict[int, list[object]] = {}
    by_task_audit: dict[int, list[object]] = {}
    for rows, into in ((outbox, by_task_outbox), (audit, by_task_audit)):
        for r in rows:
            into.setdefault(r["task_id"], []).append(r["event_id"])
    assert by_task_audit == by_task_outbox
    async with grpc_channel(system.audit.target, system.audit.ca_file) as channel:
        verdict = await audit_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(
            audit_pb2.VerifyAuditChainRequest(),
            metadata=bearer(system.keys.token(Role.AUDITOR, subject=system.auditor_id)),
        )
    assert verdict.ok
    assert verdict.rows_checked == len(outbox)


async def _redelivered(system: System) -> float:
    """Events the audit service received again and recognised as already recorded."""
    port = system.audit.metrics_port
    return await metric(port, "audit_events_recorded_total", {"result": "duplicate"})


async def test_audit_outage_under_load_loses_nothing_and_fails_no_rpc(system: System) -> None:
    task = system.task_process(0)
    system.tasks.append(task)
    await task.start()
    await drive(task.target, system.token(), tasks=20)
    await wait_all_delivered(system.deployment)
    system.audit.stop()
    # While the audit service is down every task RPC still succeeds...
    committed = await drive(task.target, system.token(), tasks=60)
    assert committed == 180

    # ...and the events wait in the outbox, visible in the metrics (once they are refreshed).
    async def backlog_shown() -> bool:
        port = task.metrics_port
        depth = await metric(port, "task_outbox_depth")
        return depth >= 1 and await metric(port, "task_outbox_lag_seconds") > 0

    await wait_until(backlog_shown, what="the outbox metrics show the backlog")
    _events, pending, _audited = await _counts(system.deployment)
    assert pending >= 1
    await system.audit.start()
    await wait_all_delivered(system.deployment)
    await assert_exactly_once_in_order(system)

    async def drained_shown() -> bool:
        return await metric(task.metrics_port, "task_outbox_depth") == 0

    await wait_until(drained_shown, what="the outbox depth metric returns to 0")


async def test_sigkill_of_the_relaying_process_mid_batch(system: System) -> None:
    # The first task process dies at the worst moment: its batch was recorded by the audit
    # service but not yet marked delivered in the outbox.
    system.env["MHV_RELAY_CRASH_AFTER_SEND"] = "true"
    doomed = system.task_process(0)
    system.tasks.append(doomed)
    await doomed.start()
    system.audit.stop()
    await drive(doomed.target, system.token(), tasks=30)
    await system.audit.start()
    assert doomed.process is not None
    process = doomed.process
    await wait_until(lambda: process.poll() is not None, what="the relay sent a batch and died")
    assert doomed.process.returncode == -9
    _events, pending, audited = await _counts(system.deployment)
    assert audited > 0 and pending > 0, "nothing was caught between recording and marking"
    del system.env["MHV_RELAY_CRASH_AFTER_SEND"]
    replacement = system.task_process(1)
    system.tasks.append(replacement)
    await replacement.start()
    await wait_all_delivered(system.deployment)
    await assert_exactly_once_in_order(system)
    # The interrupted batch was sent again and recognised, not stored twice.
    assert await _redelivered(system) >= 1


async def test_three_relays_at_once_never_send_twice(system: System) -> None:
    relays = [system.task_process(i) for i in range(3)]
    system.tasks.extend(relays)
    system.audit.stop()
    for relay in relays:
        await relay.start()
    # A backlog for all three to share, then more load spread over them while they drain it.
    await drive(relays[0].target, system.token(), tasks=150)
    await system.audit.start()

    async def delivered() -> list[float]:
        return [await metric(r.metrics_port, "task_outbox_delivered_total") for r in relays]

    # Relays that failed while the audit service was down wake from their backoff (up to 5 s)
    # at different times; the first may drain everything before the others wake. Keep load
    # coming, spread over the three, until at least two have delivered (30 s at most).
    give_up = time.monotonic() + 30
    while True:
        await asyncio.gather(*(drive(r.target, system.token(), tasks=20) for r in relays))
        if sum(1 for d in await delivered() if d > 0) >= 2 or time.monotonic() > give_up:
            break
    await wait_all_delivered(system.deployment)
    await assert_exactly_once_in_order(system)
    # No relay sent an event another relay had claimed: the audit service saw no redelivery.
    assert await _redelivered(system) == 0
    counts = await delivered()
    assert sum(1 for d in counts if d > 0) >= 2, f"only one relay did the work: {counts}"
