"""Task mutation -> audit row lag, at a steady load, through the real outbox relay.

    python -m bench.audit_lag [--rate 100] [--seconds 20]

Starts a throw-away database with the audit and task services as real processes, then changes
tasks at a steady rate (create, start, complete). Each change's event is committed to the outbox
with the change; the relay delivers it; the audit service appends it. The lag of an event is the
audit row's creation time minus the change's commit time, both on the database's clock.

The reference, measured in the same run, is the floor any relay design pays: one
RecordEvents call with a single event, from this machine, plus half the relay's poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from grpc import aio

from bench._env import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    admin_execute,
    service_env,
    start_order_ports,
    summary,
)
from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from tests.harness import RELAXED_LIMITS

POLL_SECONDS = 0.05


async def drive(target: str, token: str, *, rate: float, seconds: float) -> int:
    """Change tasks at `rate` changes per second; returns how many were made."""
    metadata = (("authorization", f"Bearer {token}"),)
    made = 0
    async with aio.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        start = time.monotonic()
        in_flight: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            nonlocal made
            task = await stub.CreateTask(
                task_pb2.CreateTaskRequest(title=f"lag {i}", repository="demo"), metadata=metadata
            )
            await stub.StartTask(task_pb2.StartTaskRequest(id=task.id), metadata=metadata)
            await stub.CompleteTask(task_pb2.CompleteTaskRequest(id=task.id), metadata=metadata)
            made += 3

        i = 0
        # Three changes per unit: schedule units at rate / 3 per second.
        while time.monotonic() - start < seconds:
            unit = asyncio.create_task(one(i))
            in_flight.add(unit)
            unit.add_done_callback(in_flight.discard)
            i += 1
            await asyncio.sleep(max(0.0, start + i * 3 / rate - time.monotonic()))
        await asyncio.gather(*in_flight)
    return made


async def record_call_floor(target: str, token: str, n: int = 200) -> list[float]:
    """Latency of RecordEvents with one new event each: the relay's unavoidable hop."""
    metadata = (("authorization", f"Bearer {token}"),)
    out = []
    async with aio.insecure_channel(target) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        for i in range(n):
            event = audit_pb2.EventRecord(
                event_id=str(uuid.uuid4()),
                task_id=10**12 + i,
                event_type="task_started",
                user_id=str(uuid.uuid4()),
            )
            event.occur_time.GetCurrentTime()
            t0 = time.monotonic()
            await stub.RecordEvents(
                audit_pb2.RecordEventsRequest(events=[event]), metadata=metadata
            )
            out.append(time.monotonic() - t0)
    return out


def _peak_memory_mb(service: ServiceProcess) -> float:
    """Peak resident memory of a service process so far (VmHWM), in MB."""
    assert service.process is not None
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(args: argparse.Namespace) -> None:
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    tmp = Path(tempfile.mkdtemp(prefix="mhv-lag-"))
    keys = Keys.create(tmp / "keys")
    user_id = str(
        await admin_execute(
            deployment.admin_url,
            "INSERT INTO task.users (username, email) VALUES ('lag', 'lag@example.test')"
            " RETURNING id",
        )
    )
    ports = start_order_ports()
    env = service_env(
        deployment,
        keys,
        {
            "MHV_TASK_GRPC_PORT": str(ports["task_grpc"]),
            "MHV_TASK_METRICS_PORT": str(ports["task_metrics"]),
            "MHV_AUDIT_GRPC_PORT": str(ports["audit_grpc"]),
            "MHV_AUDIT_METRICS_PORT": str(ports["audit_metrics"]),
            "MHV_AUDIT_TARGET": f"127.0.0.1:{ports['audit_grpc']}",
            "MHV_RELAY_POLL_INTERVAL_SECONDS": str(POLL_SECONDS),
            "MHV_LOG_LEVEL": "WARNING",
            # The relay and the reference calls share the task service's identity; its
            # production budget (200/s) is not what this measures.
            "MHV_RATE_LIMITS": json.dumps(
                {**json.loads(RELAXED_LIMITS), "service:*": "10000000/minute"}
            ),
        },
    )
    audit = ServiceProcess(
        "mhv_audit", env, ports["audit_grpc"], ports["audit_metrics"], tmp / "audit.log"
    )
    task = ServiceProcess(
        "mhv_task", env, ports["task_grpc"], ports["task_metrics"], tmp / "task.log"
    )
    try:
        await audit.start()
        await task.start()
        token = keys.token(Role.MEMBER, subject=user_id)
        await drive(task.target, token, rate=args.rate, seconds=2)  # warm-up
        conn = await asyncpg.connect(deployment.admin_url)
        try:
            since = await conn.fetchval("SELECT max(id) FROM task.outbox")
            made = await drive(task.target, token, rate=args.rate, seconds=args.seconds)
            peak = {s.module: _peak_memory_mb(s) for s in (task, audit)}
            deadline = time.monotonic() + 60
            while (
                await conn.fetchval("SELECT count(*) FROM task.outbox WHERE delivered_at IS NULL")
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.1)
            lags = [
                r["lag"]
                for r in await conn.fetch(
                    "SELECT extract(epoch FROM a.created_at - o.occurred_at)::float8 AS lag"
                    " FROM task.outbox o JOIN audit.task_audit_log a ON a.event_id = o.event_id"
                    " WHERE o.id > $1",
                    since,
                )
            ]
        finally:
            await conn.close()
        floor = await record_call_floor(
            audit.target, keys.token(Role.SERVICE, subject="service:task")
        )
        lag = summary(lags)
        ref = summary(floor)
        reference_p99 = ref["p99"] + POLL_SECONDS * 1000 / 2
        print(
            f"Audit lag at {args.rate:.0f} changes/s for {args.seconds}s: {made} changes, "
            f"{len(lags)} audit rows"
        )
        print(
            f"  mutation -> audit row : p50 {lag['p50']:6.1f} ms   p95 {lag['p95']:6.1f} ms   "
            f"p99 {lag['p99']:6.1f} ms   (goal p99 <= 250 ms)"
        )
        print(
            f"  reference             : one-event RecordEvents p50 {ref['p50']:5.1f} ms, "
            f"p99 {ref['p99']:5.1f} ms; + half the {POLL_SECONDS * 1000:.0f} ms poll"
        )
        print(
            f"  ratio                 : lag p99 is {lag['p99'] / reference_p99:.2f}x the "
            "reference p99"
        )
        print(
            "  peak memory           : "
            + ", ".join(f"{m} {mb:.0f} MB" for m, mb in peak.items())
            + " (VmHWM; goal <= 150 MB each)"
        )
    finally:
        task.stop()
        audit.stop()
        await deployment.drop()
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100.0, help="task changes per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
