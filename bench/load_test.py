"""The plan's load test: 50 virtual users for 10 minutes on a mixed workload, with thresholds.

    python -m bench.load_test [--users 50] [--duration 600] [--think 1.0] [--processes 2]

Starts a throw-away database and the whole system as real processes (audit, task with its
outbox relay, the webhook gateway with its saga workers; gRPC over TLS, HTTPS for webhooks,
logs at INFO as in production), then runs `--users` virtual users in `--processes` client
processes. Each user is its own member (own token, own rate-limit budget) and repeats: pick an
operation by weight, run it, think for `--think` seconds (the plan's ``sleep(1)``; 0 makes the
users hammer). Operations and weights:

    create 20 %   CreateTask
    get    25 %   GetTask of one of the user's tasks
    list   20 %   ListTasks of the repository, first page
    search 10 %   SearchTasks by keyword
    update 15 %   UpdateTask (priority) of one of the user's tasks, with its etag
    webhook 10 %  a signed GitHub "issues opened" delivery to the gateway (ack latency; the saga
                  turns it into a task behind it)

Prints throughput, p50/p95/p99 per operation and overall, the error rate, and the plan's
thresholds (p95 < 500 ms, errors < 1 %) as met or not. A call is an error when it fails for
any reason, a rate limit included; a refused webhook delivery (not 2xx) too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import field_mask_pb2
from grpc import aio

from bench._env import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    admin_execute,
    service_env,
    start_order_ports,
    start_together,
    summary,
    wait_for_start,
)
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.devstate import DevState
from mhv_common.auth import Role
from tests.harness import ports_env, webhook_env
from tests.webhook.signing import github_headers

WEIGHTS = {"create": 20, "get": 25, "list": 20, "search": 10, "update": 15, "webhook": 10}
THRESHOLD_P95_MS = 500.0
THRESHOLD_ERRORS = 0.01
WORDS = ("deploy", "billing", "search", "login", "export", "cache", "report", "upload")
REPOSITORY = "demo"
GITHUB_REPOSITORY = "example/demo"


# --- virtual users (client processes) -----------------------------------------------------


class _User:
    """One virtual user: its own member token and the tasks it created."""

    def __init__(
        self, stub: task_pb2_grpc.TaskServiceStub, http: httpx.AsyncClient, args: Any, token: str
    ) -> None:
        self.stub = stub
        self.http = http
        self.args = args
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.tasks: dict[int, str] = {}  # id -> etag
        self.n = 0

    def _title(self) -> str:
        self.n += 1
        return f"{random.choice(WORDS)} {random.choice(WORDS)} task {uuid.uuid4().hex[:8]}"

    async def create(self) -> None:
        task = await self.stub.CreateTask(
            task_pb2.CreateTaskRequest(title=self._title(), repository=REPOSITORY),
            metadata=self.metadata,
            timeout=10,
        )
        self.tasks[task.id] = task.etag

    async def get(self) -> None:
        if not self.tasks:
            return await self.create()
        task_id = random.choice(list(self.tasks))
        task = await self.stub.GetTask(
            task_pb2.GetTaskRequest(id=task_id), metadata=self.metadata, timeout=10
        )
        self.tasks[task.id] = task.etag

    async def list(self) -> None:
        await self.stub.ListTasks(
            task_pb2.ListTasksRequest(repository=REPOSITORY, page_size=20),
            metadata=self.metadata,
            timeout=10,
        )

    async def search(self) -> None:
        await self.stub.SearchTasks(
            task_pb2.SearchTasksRequest(query=random.choice(WORDS), page_size=20),
            metadata=self.metadata,
            timeout=10,
        )

    async def update(self) -> None:
        if not self.tasks:
            return await self.create()
        task_id = random.choice(list(self.tasks))
        task = await self.stub.UpdateTask(
            task_pb2.UpdateTaskRequest(
                task=task_pb2.Task(
                    id=task_id,
                    etag=self.tasks[task_id],
                    priority=random.choice(
                        (task_pb2.PRIORITY_LOW, task_pb2.PRIORITY_MEDIUM, task_pb2.PRIORITY_HIGH)
                    ),
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["priority"]),
            ),
            metadata=self.metadata,
            timeout=10,
        )
        self.tasks[task.id] = task.etag

    async def webhook(self) -> None:
        number = random.randrange(1, 2**31)
        body = json.dumps(
            {
                "action": "opened",
                "issue": {
                    "number": number,
                    "title": self._title(),
                    "body": "from the load test",
                    "user": {"login": "octocat"},
                },
                "repository": {"full_name": GITHUB_REPOSITORY},
                "sender": {"login": "octocat"},
            }
        ).encode()
        headers = github_headers(self.args.github_secret, body, delivery=str(uuid.uuid4()))
        reply = await self.http.post(self.args.webhook_url, content=body, headers=headers)
        if reply.status_code >= 300:
            raise RuntimeError(f"HTTP {reply.status_code}")


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return str(exc.code().name)  # type: ignore[attr-defined]
    return type(exc).__name__ + (f" {exc}" if isinstance(exc, RuntimeError) else "")


async def _client(args: argparse.Namespace, tokens: list[str], ca: bytes) -> dict[str, Any]:
    """Run this process's users for the duration; return per-operation latencies and errors."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.ssl_target_name_override", "mahavishnu-task")]
    trust = ssl.create_default_context(cafile=args.https_ca)
    ops = list(WEIGHTS)
    weights = [WEIGHTS[op] for op in ops]
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    async with (
        aio.secure_channel(args.target, credentials, options=options) as channel,
        httpx.AsyncClient(verify=trust, timeout=10) as http,
    ):
        await channel.channel_ready()
        stub = task_pb2_grpc.TaskServiceStub(channel)
        start = await wait_for_start()
        stop_at = start + args.duration

        async def user(token: str) -> None:
            me = _User(stub, http, args, token)
            # Users start spread over the first think time, as real ones arrive.
            await asyncio.sleep(max(start - time.monotonic(), 0) + random.random() * args.think)
            while time.monotonic() < stop_at:
                op = random.choices(ops, weights)[0]
                t0 = time.monotonic()
                try:
                    await getattr(me, op)()
                except Exception as exc:
                    errors[op][_error_name(exc)] += 1
                latencies[op].append(time.monotonic() - t0)
                if args.think:
                    await asyncio.sleep(args.think)

        await asyncio.gather(*(user(token) for token in tokens))
    return {"latencies": latencies, "errors": errors}


# --- the run ------------------------------------------------------------------------------


def _memory_mb(pid: int) -> tuple[float, float]:
    """(peak, current) resident memory of a process, in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS"))  # type: ignore[return-value]


def _revision() -> str:
    """The checked-out commit (with -dirty when the tree has changes)."""
    result = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return result.stdout.strip() or "unknown"


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


async def _drive(args: argparse.Namespace, tokens: list[str], tmp: Path) -> dict[str, Any]:
    shares = [tokens[i :: args.processes] for i in range(args.processes)]
    procs = []
    outs = []
    for i, share in enumerate(shares):
        token_file, out = tmp / f"tokens-{i}.json", tmp / f"result-{i}.json"
        token_file.write_text(json.dumps(share))
        outs.append(out)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.load_test",
                    "--client",
                    "--tokens",
                    str(token_file),
                    "--out",
                    str(out),
                    "--duration",
                    str(args.duration),
                    "--think",
                    str(args.think),
                    "--target",
                    args.target,
                    "--grpc-ca",
                    args.grpc_ca,
                    "--https-ca",
                    args.https_ca,
                    "--webhook-url",
                    args.webhook_url,
                    "--github-secret",
                    args.github_secret,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        await start_together(procs)
        for proc in procs:
            if await asyncio.to_thread(proc.wait) != 0:
                raise RuntimeError("a load-test client failed")
    finally:
        for proc in procs:
            proc.kill()
    merged: dict[str, Any] = {"latencies": defaultdict(list), "errors": defaultdict(dict)}
    for out in outs:
        result = json.loads(out.read_text())
        for op, values in result["latencies"].items():
            merged["latencies"][op] += values
        for op, kinds in result["errors"].items():
            for kind, count in kinds.items():
                merged["errors"][op][kind] = merged["errors"][op].get(kind, 0) + count
    return merged


def _report(args: argparse.Namespace, result: dict[str, Any], load_before: str) -> bool:
    latencies: dict[str, list[float]] = result["latencies"]
    errors: dict[str, dict[str, int]] = result["errors"]
    print(
        f"Load test: {args.users} virtual users in {args.processes} processes, think "
        f"{args.think:g} s, {args.duration:g} s; task, audit, webhook as processes (gRPC TLS, "
        f"HTTPS webhooks, log level INFO); {os.cpu_count()} cores shared with the clients"
    )
    print(f"  load average: {load_before} before, {_load()} after")
    print(
        f"  {'operation':<9} {'calls':>7} {'calls/s':>8} {'errors':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    everything: list[float] = []
    failed = 0
    for op in WEIGHTS:
        values = latencies.get(op, [])
        everything += values
        count = sum(errors.get(op, {}).values())
        failed += count
        q = summary(values)
        print(
            f"  {op:<9} {len(values):7d} {len(values) / args.duration:8.1f} {count:7d} "
            f"{q['p50']:8.1f} {q['p95']:8.1f} {q['p99']:8.1f}"
        )
    q = summary(everything)
    total = max(len(everything), 1)
    print(
        f"  {'all':<9} {len(everything):7d} {len(everything) / args.duration:8.1f} {failed:7d} "
        f"{q['p50']:8.1f} {q['p95']:8.1f} {q['p99']:8.1f}"
    )
    for op, kinds in sorted(errors.items()):
        print(f"  errors of {op}: {dict(kinds)}")
    p95_met = q["p95"] < THRESHOLD_P95_MS
    errors_met = failed / total < THRESHOLD_ERRORS
    print(
        f"  threshold p95 < {THRESHOLD_P95_MS:.0f} ms: {'met' if p95_met else 'NOT met'} "
        f"({q['p95']:.1f} ms)"
    )
    print(
        f"  threshold errors < {THRESHOLD_ERRORS:.0%}: {'met' if errors_met else 'NOT met'} "
        f"({failed / total:.2%})"
    )
    return p95_met and errors_met


async def run(args: argparse.Namespace) -> bool:
    """Start the system, run the users, print the report; whether both thresholds were met."""
    revision = _revision()  # what the services are about to load
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    tmp = Path(tempfile.mkdtemp(prefix="mhv-load-"))
    keys = Keys.create(tmp / "keys")
    grpc_tls = DevState(tmp / "grpc-tls")
    grpc_tls.ensure_grpc_tls()
    hooks = webhook_env(tmp / "webhook-state")
    ports = start_order_ports()
    env = service_env(
        deployment,
        keys,
        {
            **ports_env(ports),
            **hooks,
            "MHV_GRPC_TLS_CA_FILE": str(grpc_tls.grpc_ca),
            "MHV_WEBHOOK_WORKERS": "2",
            "MHV_LOG_LEVEL": "INFO",
            "MHV_DB_POOL_MAX_SIZE": str(args.pool),
        },
    )
    services = [
        ServiceProcess(
            f"mhv_{name}",
            {
                **env,
                "MHV_GRPC_TLS_CERT_FILE": str(grpc_tls.grpc_cert(name)),
                "MHV_GRPC_TLS_KEY_FILE": str(grpc_tls.grpc_key(name)),
            },
            ports[f"{name}_grpc"],
            ports[f"{name}_metrics"],
            tmp / f"{name}.log",
            ca_file=grpc_tls.grpc_ca,
        )
        for name in ("audit", "task", "webhook")
    ]
    try:
        tokens = []
        for i in range(args.users):
            user_id = await admin_execute(
                deployment.admin_url,
                "INSERT INTO task.users (username, email) VALUES ($1, $2) RETURNING id",
                f"load{i}",
                f"load{i}@example.test",
            )
            tokens.append(keys.token(Role.MEMBER, subject=str(user_id), ttl_seconds=48 * 3600))
        for service in services:
            await service.start(timeout=60)
        args.target = services[1].target
        args.grpc_ca = str(grpc_tls.grpc_ca)
        args.https_ca = hooks["MHV_WEBHOOK_TLS_CERT_FILE"]
        args.webhook_url = f"https://127.0.0.1:{ports['webhook_https']}/webhooks/github"
        args.github_secret = hooks["MHV_WEBHOOK_SECRETS_GITHUB"]
        load_before = _load()
        result = await _drive(args, tokens, tmp)
        met = _report(args, result, load_before)
        memory = {s.module: _memory_mb(s.process.pid) for s in services if s.process}
        print(
            "  memory (peak RSS / RSS now, MB): "
            + ", ".join(f"{m} {peak:.0f} / {now:.0f}" for m, (peak, now) in memory.items())
        )
        print(f"  code: {revision}")
        return met
    finally:
        for service in reversed(services):
            service.stop()
        await deployment.drop()
        await cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50, help="virtual users")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (plan: 10 min)")
    parser.add_argument("--think", type=float, default=1.0, help="seconds between a user's calls")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--pool", type=int, default=10, help="each service's pool size")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    for hidden in (
        "--tokens",
        "--out",
        "--target",
        "--grpc-ca",
        "--https-ca",
        "--webhook-url",
        "--github-secret",
    ):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        tokens = json.loads(Path(args.tokens).read_text())
        ca = Path(args.grpc_ca).read_bytes()
        Path(args.out).write_text(json.dumps(asyncio.run(_client(args, tokens, ca))))
        return
    raise SystemExit(0 if asyncio.run(run(args)) else 1)


if __name__ == "__main__":
    main()
