"""CreateTask throughput and latency over gRPC, beside pgbench running the same INSERT.

    python -m bench.create_task [--clients 50] [--seconds 20] [--processes 4] [--replicas 1]
                                [--tls] [--log-level INFO] [--breakdown] [--profile FILE]
                                [--rounds 1] [--against REV] [--rpc create|get|list]

Starts a throw-away database and the task service as a real process (or several on one port),
then drives CreateTask from several client processes so the client is not the bottleneck.
In the same run, pgbench executes the very statement the service sends per CreateTask (task
row and its outbox event, one statement) with as many clients: that is the database's own
limit for this work, and the service's figures are printed as a ratio of it. With --tls the
service and the gRPC floor serve TLS, as deployed, and the clients verify their certificates.

With --breakdown the service is measured once more without each concern in turn (tracing,
access log, metrics, deadline, auth, rate limit, pool wrapper, the whole interceptor chain; see
`bench._task_variant`): the difference against the full chain is what the concern costs per
call. With --against REV the service as of that git revision runs beside this tree's. Each of
--rounds rounds measures everything once; differences and ratios are taken within a round (the
same moment's load on a shared machine) and the median over the rounds is printed.

With --rpc get or list the clients drive the read path instead (GetTask of one of 20 tasks they
made beforehand, ListTasks of the repository's first 20); pgbench still runs the INSERT.

CPU per call is the servers' CPU time inside the measured window (after the warm-up, read from
/proc at the window's edges) over the calls started in that window; the clients start together
once all are connected. Figures on a shared machine move with its load: compare the ratios
against the floor, measured in the same run, and note the load average printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
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
    start_together,
    summary,
    wait_for_start,
)
from bench._grpc_floor import METHOD as FLOOR_METHOD
from bench._task_variant import CONCERNS
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from mhv_task import _store

ROOT = Path(__file__).resolve().parents[1]
RPC_NAMES = {"create": "CreateTask", "get": "GetTask", "list": "ListTasks (20 tasks a page)"}
# Issue 17's goals: server CPU per call against the gRPC floor's.
CPU_GOALS = {"create": 2.0, "get": 1.6, "list": 1.6}

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
        "$14": "'task_created'",
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


async def _client(args: argparse.Namespace, ca: bytes | None) -> dict[str, Any]:
    """Call until the window closes; return the window's latencies and this process's CPU."""
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {args.token}"),)
    if ca is not None:
        tls = grpc.ssl_channel_credentials(root_certificates=ca)
        options = [("grpc.ssl_target_name_override", "mahavishnu-task")]
        channel_ = aio.secure_channel(args.target, tls, options=options)
    else:
        channel_ = aio.insecure_channel(args.target)
    async with channel_ as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        empty = channel.unary_unary(FLOOR_METHOD)
        await channel.channel_ready()
        # The read path reads tasks that exist: a few of the client's own, made beforehand.
        seeded = [
            (
                await stub.CreateTask(
                    task_pb2.CreateTaskRequest(title=f"seed {n}", repository="demo"),
                    metadata=metadata,
                )
            ).id
            for n in range(20 if args.rpc != "create" and not args.floor else 0)
        ]
        # Every client process starts at the same moment, which the driver sends once all are
        # connected: the measured window is then the same for them and for the server's CPU.
        start = await wait_for_start()
        window_start = start + args.warmup
        stop_at = window_start + args.seconds
        cpu: dict[str, float] = {}

        async def sample_cpu() -> None:
            await asyncio.sleep(max(window_start - time.monotonic(), 0))
            cpu["start"] = time.process_time()
            await asyncio.sleep(max(stop_at - time.monotonic(), 0))
            cpu["stop"] = time.process_time()

        async def worker(n: int) -> None:
            await asyncio.sleep(max(start - time.monotonic(), 0))
            i = 0
            while (t0 := time.monotonic()) < stop_at:
                if args.floor:
                    await empty(b"")
                elif args.rpc == "get":
                    await stub.GetTask(
                        task_pb2.GetTaskRequest(id=seeded[i % len(seeded)]), metadata=metadata
                    )
                elif args.rpc == "list":
                    await stub.ListTasks(
                        task_pb2.ListTasksRequest(repository="demo", page_size=20),
                        metadata=metadata,
                    )
                else:
                    await stub.CreateTask(
                        task_pb2.CreateTaskRequest(title=f"bench {n}-{i}", repository="demo"),
                        metadata=metadata,
                    )
                # Calls started in the window count; the server's CPU is read at its edges.
                if t0 >= window_start:
                    latencies.append(time.monotonic() - t0)
                i += 1

        await asyncio.gather(sample_cpu(), *(worker(n) for n in range(args.concurrency)))
    return {"latencies": latencies, "cpu_seconds": cpu["stop"] - cpu["start"]}


@dataclass
class Load:
    """What one load run measured, over the same window for the clients and the servers."""

    rps: float
    latency_ms: dict[str, float]
    server_cpu_us: float
    client_cpu_us: float


async def drive(
    args: argparse.Namespace,
    target: str,
    token: str,
    server_pids: list[int],
    tmp: Path,
    *,
    floor: bool,
    profile: Path | None = None,
) -> Load:
    """Run the client processes against `target` and measure them and the servers.

    The clients connect, then start together; after `args.warmup` seconds the measured window
    of `args.seconds` opens. Server CPU is read at the window's edges and divided by the calls
    started inside it, so neither start-up nor warm-up is charged to the measured calls.
    """
    per_process = max(1, args.clients // args.processes)
    outs = [tmp / f"lat-{'floor' if floor else 'svc'}-{i}.json" for i in range(args.processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.create_task",
                "--client",
                "--target",
                target,
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
                *(["--ca", str(args.ca)] if args.ca else []),
                *(["--floor"] if floor else []),
                "--rpc",
                args.rpc,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    try:
        start = await start_together(procs)
        await asyncio.sleep(max(start + args.warmup - time.monotonic(), 0))
        cpu_before = sum(_cpu_seconds(pid) for pid in server_pids)
        # py-spy samples the first server over the window without stopping it.
        profiler = None if profile is None else _profiler(server_pids[0], args.seconds, profile)
        await asyncio.sleep(max(start + args.warmup + args.seconds - time.monotonic(), 0))
        server_cpu = sum(_cpu_seconds(pid) for pid in server_pids) - cpu_before
        for proc in procs:
            if await asyncio.to_thread(proc.wait) != 0:
                raise RuntimeError("a bench client failed")
        if profiler is not None and await asyncio.to_thread(profiler.wait) != 0:
            print(f"py-spy could not profile the service; no {profile}", file=sys.stderr)
    finally:
        for proc in procs:
            proc.kill()
    results = [json.loads(out.read_text()) for out in outs]
    latencies = [x for result in results for x in result["latencies"]]
    client_cpu = sum(result["cpu_seconds"] for result in results)
    count = max(len(latencies), 1)
    return Load(
        len(latencies) / args.seconds,
        summary(latencies),
        server_cpu / count * 1e6,
        client_cpu / count * 1e6,
    )


def _profiler(pid: int, seconds: int, out: Path) -> subprocess.Popen[str]:
    """py-spy recording `pid` for `seconds`: flame graph (.svg), speedscope (.json) or
    collapsed stacks (.txt)."""
    fmt = {".json": "speedscope", ".txt": "raw"}.get(out.suffix, "flamegraph")
    return subprocess.Popen(
        [
            str(Path(sys.executable).with_name("py-spy")),
            "record",
            "--nonblocking",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--format",
            fmt,
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _median_load(rounds: list[dict[str, Load]], name: str) -> Load:
    """The median over the rounds of each of one measurement's figures."""
    loads = [r[name] for r in rounds]
    return Load(
        statistics.median(x.rps for x in loads),
        {q: statistics.median(x.latency_ms[q] for x in loads) for q in loads[0].latency_ms},
        statistics.median(x.server_cpu_us for x in loads),
        statistics.median(x.client_cpu_us for x in loads),
    )


def _median_ratio(rounds: list[dict[str, Load]], top: str, bottom: str, figure: str) -> float:
    """The median over the rounds of top/bottom for one figure, each from the same round."""
    return statistics.median(getattr(r[top], figure) / getattr(r[bottom], figure) for r in rounds)


def _print_breakdown(rounds: list[dict[str, Load]]) -> None:
    """What each concern costs: the full chain's CPU per call minus the variant's without it."""
    full = [r["service"].server_cpu_us for r in rounds]
    floor = statistics.median(r["floor"].server_cpu_us for r in rounds)
    print(
        f"\nBreakdown: server CPU per CreateTask without one concern, against the full chain "
        f"of the same round (full chain {', '.join(f'{x:.0f}' for x in full)} us/call; floor "
        f"{floor:.0f} us/call); medians of {len(rounds)} round(s); load average {_load()}"
    )
    print(
        f"  {'without':<11} {'CPU us/call':>11} {'saves us':>9} {'floor x':>8} "
        f"{'creates/s':>9} {'p95 ms':>7}  what is taken out"
    )
    for concern in CONCERNS:
        load = _median_load(rounds, concern)
        saved = statistics.median(
            r["service"].server_cpu_us - r[concern].server_cpu_us for r in rounds
        )
        print(
            f"  {concern:<11} {load.server_cpu_us:11.0f} {saved:9.0f} "
            f"{saved / floor:8.2f} {load.rps:9.0f} {load.latency_ms['p95']:7.1f}"
            f"  {CONCERNS[concern]}"
        )
    if len(full) > 1:
        print(f"  (noise: the full chain's rounds span {max(full) - min(full):.0f} us/call)")


def _checkout(revision: str, folder: Path) -> Path:
    """This repository's code and settings as of `revision`, extracted into `folder`."""
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", revision, "libs", "services", "settings"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _source_paths(tree: Path) -> list[str]:
    """Import roots of a source tree's packages (they come before the installed ones)."""
    return [str(tree / "libs" / "common"), str(tree / "services" / "task")]


def _load() -> str:
    """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _client_main(args: argparse.Namespace) -> None:
    ca = Path(args.ca).read_bytes() if args.ca else None
    Path(args.out).write_text(json.dumps(asyncio.run(_client(args, ca))))


async def run(args: argparse.Namespace) -> None:
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    tmp = Path(tempfile.mkdtemp(prefix="mhv-bench-"))
    keys = Keys.create(tmp / "keys")
    tls_env: dict[str, str] = {}
    floor_tls: list[str] = []
    if args.tls:
        state = DevState(tmp / "tls")
        state.ensure_grpc_tls(("task",))
        cert, key = str(state.grpc_cert("task")), str(state.grpc_key("task"))
        tls_env = {"MHV_GRPC_TLS_CERT_FILE": cert, "MHV_GRPC_TLS_KEY_FILE": key}
        floor_tls = [cert, key]
        args.ca = str(state.grpc_ca)
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
            "MHV_RELAY_ENABLED": "false",
            "MHV_DB_POOL_MAX_SIZE": str(args.pool),
            "MHV_DB_POOL_MIN_SIZE": str(args.pool),
            # The production level: the access log line of every call is part of its cost.
            "MHV_LOG_LEVEL": args.log_level,
            "MHV_REUSE_PORT": "true" if args.replicas > 1 else "false",
            **tls_env,
        },
    )
    ca_file = Path(args.ca) if args.ca else None
    against = _checkout(args.against, tmp / "against") if args.against else None

    async def measure(without: str = "", *, source: Path | None = None) -> Load:
        # The service as deployed, with the concern `without` taken out (breakdown), or run
        # from another revision's source (`--against`).
        extra = {"PYTHONPATH": os.pathsep.join(_source_paths(source))} if source else {}
        name = without or ("against" if source else "full")
        replicas = [
            ServiceProcess(
                "bench._task_variant" if without else "mhv_task",
                {
                    **env,
                    **extra,
                    "MHV_TASK_METRICS_PORT": str(free_port()),
                    "BENCH_WITHOUT": without,
                    "BENCH_SUBJECT": user_id,
                },
                ports["task_grpc"],
                0,
                tmp / f"task-{name}-{i}.log",
                ca_file=ca_file,
            )
            for i in range(args.replicas)
        ]
        try:
            for replica in replicas:
                await replica.start()
            pids = [r.process.pid for r in replicas if r.process]
            profile = None if without or source or not args.profile else Path(args.profile)
            return await drive(
                args, replicas[0].target, token, pids, tmp, floor=False, profile=profile
            )
        finally:
            for replica in replicas:
                replica.stop()

    token = keys.token(Role.MEMBER, subject=user_id, ttl_seconds=3600)
    floor_port = free_port()
    floor_server = subprocess.Popen(
        [sys.executable, "-m", "bench._grpc_floor", "serve", str(floor_port), *floor_tls]
    )
    try:
        # Each round measures everything once, one after the other: a comparison is made
        # within a round (the same moment's load), and the rounds' median is reported.
        rounds: list[dict[str, Load]] = []
        for _ in range(args.rounds):
            got = {"service": await measure()}
            if against is not None:
                got["against"] = await measure(source=against)
            if args.breakdown:
                for concern in CONCERNS:
                    got[concern] = await measure(concern)
            got["floor"] = await drive(
                args, f"127.0.0.1:{floor_port}", token, [floor_server.pid], tmp, floor=True
            )
            rounds.append(got)
        floor_server.kill()
        clients = max(1, args.clients // args.processes) * args.processes
        script = PGBENCH_SCRIPT.format(insert=_pgbench_statement(user_id))
        pg_tps, pg_latencies = await asyncio.to_thread(
            pgbench,
            deployment.role_url("task"),
            script,
            clients=clients,
            threads=2,
            seconds=args.seconds,
        )
        pg = summary(pg_latencies)
        service, floor = _median_load(rounds, "service"), _median_load(rounds, "floor")
        lat = service.latency_ms
        print(
            f"{RPC_NAMES[args.rpc]} over gRPC, {clients} clients in {args.processes} processes, "
            f"{args.replicas} service process(es), {'TLS' if args.tls else 'plaintext'}, "
            f"log level {args.log_level}, {args.seconds}s after {args.warmup}s warm-up, "
            f"{args.rounds} round(s) (medians), all on this machine's cores; "
            f"load average {_load()}"
        )
        print(
            f"  service      : {service.rps:7.0f} calls/s  p50 {lat['p50']:6.1f} ms  "
            f"p95 {lat['p95']:6.1f} ms  p99 {lat['p99']:6.1f} ms  "
            f"server CPU {service.server_cpu_us:5.0f} us/call  "
            f"client CPU {service.client_cpu_us:4.0f} us/call"
        )
        if against is not None:
            old = _median_load(rounds, "against")
            print(
                f"  {args.against[:12]:<13}: {old.rps:7.0f} calls/s  p50 "
                f"{old.latency_ms['p50']:6.1f} ms  p95 {old.latency_ms['p95']:6.1f} ms  p99 "
                f"{old.latency_ms['p99']:6.1f} ms  server CPU {old.server_cpu_us:5.0f} us/call"
            )
        print(
            f"  gRPC floor   : {floor.rps:7.0f} empty calls/s  p50 {floor.latency_ms['p50']:6.1f}"
            f" ms  p99 {floor.latency_ms['p99']:6.1f} ms  server CPU "
            f"{floor.server_cpu_us:5.0f} us/call  (grpc.aio, no interceptors, same clients)"
        )
        print(
            f"  pgbench      : {pg_tps:7.0f} inserts/s  p50 {pg['p50']:6.1f} ms  "
            f"p95 {pg['p95']:6.1f} ms  p99 {pg['p99']:6.1f} ms  (the service's statement)"
        )
        cpu_x = _median_ratio(rounds, "service", "floor", "server_cpu_us")
        rps_x = _median_ratio(rounds, "service", "floor", "rps")
        print(
            f"  ratio        : server CPU {cpu_x:.2f}x the floor's (goal <= "
            f"{CPU_GOALS[args.rpc]}x); throughput "
            f"{rps_x:.2f}x the floor (goal >= 0.5x), {service.rps / pg_tps:.2f}x pgbench; p99 "
            f"{lat['p99'] / pg['p99']:.2f}x pgbench's; p95 {lat['p95']:.1f} ms (SLO < 100 ms)"
        )
        if against is not None:
            old_x = _median_ratio(rounds, "against", "floor", "server_cpu_us")
            change = _median_ratio(rounds, "service", "against", "server_cpu_us")
            print(
                f"  against      : {args.against} at {old_x:.2f}x the floor's CPU, "
                f"{_median_ratio(rounds, 'against', 'floor', 'rps'):.2f}x its throughput; this "
                f"tree's CPU per call is {change:.2f}x {args.against}'s (per round: "
                + ", ".join(
                    f"{r['service'].server_cpu_us:.0f}/{r['against'].server_cpu_us:.0f}"
                    for r in rounds
                )
                + " us)"
            )
        if args.breakdown:
            _print_breakdown(rounds)
    finally:
        floor_server.kill()
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
    parser.add_argument("--tls", action="store_true", help="serve and call over TLS")
    parser.add_argument(
        "--rpc",
        choices=sorted(RPC_NAMES),
        default="create",
        help="the call to drive: CreateTask, or the read path's GetTask / ListTasks",
    )
    parser.add_argument(
        "--log-level", default="INFO", help="the service's MHV_LOG_LEVEL (production: INFO)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure the service without each concern in turn (bench._task_variant)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="py-spy profile of the service over the window: .svg flame graph, .json "
        "speedscope, .txt collapsed stacks",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure everything this many times; medians"
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also measure the service as of this git revision, in the same rounds",
    )
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
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
