"""CreateTask throughput and latency over gRPC, beside pgbench running the same INSERT.

    python -m bench.create_task [--clients 50] [--seconds 20] [--processes 4] [--replicas 1]

Starts a throw-away database and the task service as a real process (or several on one port),
then drives CreateTask from several client processes so the client is not the bottleneck.
In the same run, pgbench executes the very statement the service sends per CreateTask (task
row and its outbox event, one statement) with as many clients: that is the database's own
limit for this work, and the service's figures are printed as a ratio of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpc import aio

from bench._env import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    admin_execute,
    pgbench,
    service_env,
    start_order_ports,
    summary,
)
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from mhv_task import _store

PGBENCH_SCRIPT = """
\\set n random(1, 1000000000)
{insert} ;
"""


def _pgbench_statement(user_id: str) -> str:
    # The service's statement with literal values in place of its parameters.
    sql = _store._INSERT_TASK
    values = {
        "$10": "NULL",
        "$11": '\'{"title": "bench", "status": "pending"}\'',
        "$12": "'bench'",
        "$13": "''",
        "$1": f"'{user_id}'::uuid",
        "$2": "NULL::uuid",
        "$3": "'bench task ' || :n",
        "$4": "NULL",
        "$5": "'demo'",
        "$6": "'medium'",
        "$7": "NULL::timestamptz",
        "$8": "'{}'",
        "$9": "NULL",
    }
    for key in sorted(values, key=len, reverse=True):
        sql = sql.replace(key, values[key])
    return " ".join(sql.split())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _client(
    target: str, token: str, seconds: float, warmup: float, concurrency: int
) -> list[float]:
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {token}"),)
    async with aio.insecure_channel(target) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        start = time.monotonic()
        stop_at = start + warmup + seconds

        async def worker(n: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                await stub.CreateTask(
                    task_pb2.CreateTaskRequest(title=f"bench {n}-{i}", repository="demo"),
                    metadata=metadata,
                )
                if t0 - start >= warmup:
                    latencies.append(time.monotonic() - t0)
                i += 1

        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return latencies


def _client_main(args: argparse.Namespace) -> None:
    latencies = asyncio.run(
        _client(args.target, args.token, args.seconds, args.warmup, args.concurrency)
    )
    Path(args.out).write_text(json.dumps(latencies))


async def run(args: argparse.Namespace) -> None:
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    tmp = Path(tempfile.mkdtemp(prefix="mhv-bench-"))
    keys = Keys.create(tmp / "keys")
    user_id = str(
        await admin_execute(
            deployment.admin_url,
            "INSERT INTO task.users (username, email) VALUES ('bench', 'bench@example.test')"
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
            "MHV_RELAY_ENABLED": "false",
            "MHV_DB_POOL_MAX_SIZE": str(args.pool),
            "MHV_DB_POOL_MIN_SIZE": str(args.pool),
            "MHV_LOG_LEVEL": "WARNING",
        },
    )
    env["MHV_GRPC_REUSE_PORT"] = "true" if args.replicas > 1 else "false"
    replicas = [
        ServiceProcess(
            "mhv_task",
            {**env, "MHV_TASK_METRICS_PORT": str(ports["task_metrics"] + 100 + i)},
            ports["task_grpc"],
            ports["task_metrics"] + 100 + i,
            tmp / f"task{i}.log",
        )
        for i in range(args.replicas)
    ]
    service = replicas[0]
    try:
        for replica in replicas:
            await replica.start()
        token = keys.token(Role.MEMBER, subject=user_id, ttl_seconds=3600)
        per_process = max(1, args.clients // args.processes)
        outs = [tmp / f"lat{i}.json" for i in range(args.processes)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.create_task",
                    "--client",
                    "--target",
                    service.target,
                    "--token",
                    token,
                    "--seconds",
                    str(args.seconds),
                    "--warmup",
                    str(args.warmup),
                    "--concurrency",
                    str(per_process),
                    "--out",
                    str(out),
                ]
            )
            for out in outs
        ]
        cpu_before = sum(_cpu_seconds(r.process.pid) for r in replicas if r.process)
        client_cpu = 0.0
        for proc in procs:
            # Reap through wait4 to read the child's CPU time.
            _pid, _status, usage = await asyncio.to_thread(os.wait4, proc.pid, 0)
            proc.returncode = 0
            client_cpu += usage.ru_utime + usage.ru_stime
        cpu_used = sum(_cpu_seconds(r.process.pid) for r in replicas if r.process) - cpu_before
        latencies = [x for out in outs for x in json.loads(out.read_text())]
        service_rps = len(latencies) / args.seconds
        service_lat = summary(latencies)
        for replica in replicas:
            replica.stop()

        script = PGBENCH_SCRIPT.format(insert=_pgbench_statement(user_id))
        pg_tps, pg_latencies = await asyncio.to_thread(
            pgbench,
            deployment.role_url("task"),
            script,
            clients=per_process * args.processes,
            threads=2,
            seconds=args.seconds,
        )
        pg_lat = summary(pg_latencies)
        print(
            f"CreateTask over gRPC, {per_process * args.processes} clients in "
            f"{args.processes} processes, {args.replicas} service process(es), "
            f"{args.seconds}s (after {args.warmup}s warm-up)"
        )
        print(
            f"  service : {service_rps:8.0f} creates/s   p50 {service_lat['p50']:6.1f} ms   "
            f"p95 {service_lat['p95']:6.1f} ms   p99 {service_lat['p99']:6.1f} ms"
        )
        print(
            f"  service CPU: {cpu_used / max(len(latencies), 1) * 1e6:6.0f} us per CreateTask "
            "(all service processes; the count excludes warm-up, the CPU does not)"
        )
        print(
            f"  client CPU: {client_cpu / max(len(latencies), 1) * 1e6:6.0f} us per CreateTask "
            "(load generators, on the same 2 cores)"
        )
        print(
            f"  pgbench : {pg_tps:8.0f} inserts/s   p50 {pg_lat['p50']:6.1f} ms   "
            f"p95 {pg_lat['p95']:6.1f} ms   p99 {pg_lat['p99']:6.1f} ms   (same statement)"
        )
        print(
            f"  ratio   : throughput {service_rps / pg_tps:.2f}x of pgbench (goal >= 0.5x); "
            f"p99 {service_lat['p99'] / pg_lat['p99']:.2f}x of pgbench's (goal <= 3x); "
            f"p95 {service_lat['p95']:.1f} ms (SLO < 100 ms)"
        )
    finally:
        for replica in replicas:
            replica.stop()
        await deployment.drop()
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=1, help="task service processes")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
