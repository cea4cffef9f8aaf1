"""Overload: the task service offered five times what this machine serves, with and without
admission control.

    python -m bench.overload [--seconds 10] [--factor 5] [--bound 16] [--pool 4]

Starts a throw-away database and the task service as a real process, then runs three phases
against it, each `--seconds` long:

1. capacity: closed-loop CreateTask at the concurrency that fills the bound: the throughput this
   machine serves (the physical limit of this run, measured in it);
2. overload: open-loop arrivals at `--factor` times that rate, sent whatever the answers; shed
   calls are counted, not retried;
3. recovery: closed loop again, as in 1.

The overload phase runs twice: with ``MHV_MAX_IN_FLIGHT=--bound`` and with no bound (0), so the
figures show what admission control changes: p99 of admitted calls against the capacity
phase's, calls shed with MHV-017 (UNAVAILABLE, RetryInfo) against calls failed any other way.
The client is one asyncio process on the same (shared) cores: when it cannot offer the asked
rate it prints the rate it did offer, and its own latencies include its own queueing. The
server's view of admitted calls, unaffected by the client, is printed beside them: the p99 of
``grpc_server_handling_seconds`` over the phase (shed calls never reach that histogram), as the
upper bound of its bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio

from bench._env import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    admin_execute,
    scrape,
    service_env,
    start_order_ports,
    summary,
)
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from mhv_common.errors import from_rpc_error


@dataclass
class Phase:
    """What one phase saw."""

    seconds: float
    server_p99_ms: float = math.nan
    offered: int = 0
    latencies: list[float] = field(default_factory=list)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def served_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def line(self, name: str) -> str:
        lat = summary(self.latencies)
        failed = {k: v for k, v in self.outcomes.items() if k not in ("OK", "MHV-017")}
        return (
            f"  {name:<22}: offered {self.offered / self.seconds:6.0f}/s  served "
            f"{self.served_per_second:6.0f}/s  p50 {lat['p50']:7.1f} ms  p99 {lat['p99']:7.1f} ms"
            f"  server p99 <= {self.server_p99_ms:5.0f} ms  shed (MHV-017) "
            f"{self.outcomes['MHV-017']:6d}  other failures {failed or 0}"
        )


_HANDLING = "grpc_server_handling_seconds_bucket"


async def _buckets(port: int) -> dict[float, float]:
    """Cumulative counts of CreateTask's server handling time, by bucket upper bound."""
    samples = await scrape(port)
    return {
        float(dict(labels)["le"]): value
        for (name, labels), value in samples.items()
        if name == _HANDLING and dict(labels).get("grpc_method") == "CreateTask"
    }


def _p99_bound(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound (ms) of the bucket holding the p99 of the calls between two scrapes."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get(math.inf, 0.0)
    if not total:
        return math.nan
    for le in sorted(delta):
        if delta[le] >= 0.99 * total:
            return le * 1000
    return math.inf


async def measured(port: int, run: Awaitable[Phase]) -> Phase:
    """`run`, with the server's own p99 of the calls it handled meanwhile."""
    before = await _buckets(port)
    phase = await run
    phase.server_p99_ms = _p99_bound(before, await _buckets(port))
    return phase


def _outcome(error: grpc.RpcError) -> str:
    typed = from_rpc_error(error)
    return typed.code if typed is not None else error.code().name


async def _call(stub: task_pb2_grpc.TaskServiceStub, token: str, phase: Phase) -> None:
    request = task_pb2.CreateTaskRequest(
        title="overload", repository="demo", request_id=uuid.uuid4().hex
    )
    started = time.monotonic()
    phase.offered += 1
    try:
        await stub.CreateTask(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    except aio.AioRpcError as exc:
        phase.outcomes[_outcome(exc)] += 1
        return
    phase.outcomes["OK"] += 1
    phase.latencies.append(time.monotonic() - started)


async def closed_loop(
    stub: task_pb2_grpc.TaskServiceStub, token: str, *, concurrency: int, seconds: float
) -> Phase:
    """`concurrency` callers, each sending its next call when the last one is answered."""
    phase = Phase(seconds)
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            await _call(stub, token, phase)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return phase


async def open_loop(
    stub: task_pb2_grpc.TaskServiceStub, token: str, *, rate: float, seconds: float
) -> Phase:
    """Calls arriving at `rate` per second, whether or not earlier ones were answered."""
    phase = Phase(seconds)
    started = time.monotonic()
    calls: list[asyncio.Task[None]] = []
    sent = 0
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started) * rate)
        for _ in range(due - sent):
            calls.append(asyncio.ensure_future(_call(stub, token, phase)))
        sent = max(sent, due)
        await asyncio.sleep(0.005)
    await asyncio.gather(*calls)
    return phase


async def _service(
    deployment: Deployment, keys: Keys, tmp: Path, *, bound: int, pool: int
) -> ServiceProcess:
    ports = start_order_ports()
    metrics_port = free_port()
    env = service_env(
        deployment,
        keys,
        {
            "MHV_TASK_GRPC_PORT": str(ports["task_grpc"]),
            "MHV_TASK_METRICS_PORT": str(metrics_port),
            "MHV_RELAY_ENABLED": "false",
            "MHV_DB_POOL_MIN_SIZE": str(pool),
            "MHV_DB_POOL_MAX_SIZE": str(pool),
            "MHV_MAX_IN_FLIGHT": str(bound),
            "MHV_LOG_LEVEL": "WARNING",
        },
    )
    process = ServiceProcess(
        "mhv_task", env, ports["task_grpc"], metrics_port, tmp / f"task-bound-{bound}.log"
    )
    await process.start()
    return process


async def run(args: argparse.Namespace) -> None:
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    tmp = Path(tempfile.mkdtemp(prefix="mhv-overload-"))
    keys = Keys.create(tmp / "keys")
    try:
        user_id = str(
            await admin_execute(
                deployment.admin_url,
                "INSERT INTO task.users (username, email) VALUES ('overload', "
                "'overload@example.test') RETURNING id",
            )
        )
        token = keys.token(Role.MEMBER, subject=user_id, ttl_seconds=3600)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"CreateTask, task service with a pool of {args.pool}, {args.seconds:g} s per phase, "
            f"overload {args.factor:g}x the measured capacity; load average {load}"
        )
        for bound in (args.bound, 0):
            process = await _service(deployment, keys, tmp, bound=bound, pool=args.pool)
            try:
                async with aio.insecure_channel(process.target) as channel:
                    stub = task_pb2_grpc.TaskServiceStub(channel)
                    concurrency = args.bound
                    await closed_loop(stub, token, concurrency=concurrency, seconds=args.warmup)
                    port = process.metrics_port
                    capacity = await measured(
                        port,
                        closed_loop(stub, token, concurrency=concurrency, seconds=args.seconds),
                    )
                    rate = capacity.served_per_second * args.factor
                    overload = await measured(
                        port, open_loop(stub, token, rate=rate, seconds=args.seconds)
                    )
                    recovery = await measured(
                        port,
                        closed_loop(stub, token, concurrency=concurrency, seconds=args.seconds),
                    )
            finally:
                process.stop()
            label = f"MHV_MAX_IN_FLIGHT={bound}" if bound else "no bound"
            print(f" {label}:")
            print(capacity.line(f"capacity ({concurrency} callers)"))
            print(overload.line(f"overload ({args.factor:g}x, open)"))
            print(recovery.line("recovery"))
            cap_p99 = summary(capacity.latencies)["p99"]
            over_p99 = summary(overload.latencies)["p99"]
            print(
                f"  ratio                 : served under overload "
                f"{overload.served_per_second / capacity.served_per_second:.2f}x capacity; "
                f"p99 of admitted {over_p99 / cap_p99:.2f}x capacity's; offered "
                f"{overload.offered / args.seconds / capacity.served_per_second:.2f}x capacity"
            )
    finally:
        await deployment.drop()
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--bound", type=int, default=16, help="MHV_MAX_IN_FLIGHT")
    parser.add_argument("--pool", type=int, default=4)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
