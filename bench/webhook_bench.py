"""Webhook gateway throughput and ack latency over HTTPS, beside pgbench on the same SQL.

    .venv/bin/python bench/webhook_bench.py [--seconds 20] [--clients 3] [--connections 16]

What it does, in one run:

1. creates a throw-away database with the service roles and migrations (the test harness's
   way: ``MHV_TEST_DATABASE_URL``, else PostgreSQL on 127.0.0.1:5432, else a private one);
2. runs pgbench with the gateway's own claim-and-enqueue statement (``ACCEPT_SQL``, the same
   text with its parameters filled in, 10 % repeats) as the webhook role: the physical
   limit of the database for this work;
3. starts the real gateway process (TLS, one event loop) and drives it from several client
   processes over keep-alive HTTPS connections with signed Standard Webhooks deliveries,
   10 % of them exact repeats of an earlier one (acknowledged 200, not enqueued);
4. prints verified deliveries/s, the ack latency p50/p99 seen by the clients, the pgbench
   figures and the ratio gateway/pgbench.

Goal (issue 17): >= 1,500 verified deliveries/s per gateway process with ack p99 <= 50 ms.
Figures depend on the machine being otherwise idle; the clients share the same cores as the
gateway and PostgreSQL. Also printed: the gateway's peak resident memory (goal <= 150 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import resource
import secrets
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DUPLICATE_SHARE = 0.10
BODY_BYTES = 1024


# --- client processes ---------------------------------------------------------------------


def _sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _request(key: bytes, port: int) -> bytes:
    msg_id = f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time())
    payload = {"type": "issue.created", "data": {"id": msg_id, "pad": ""}}
    payload["data"]["pad"] = "x" * max(0, BODY_BYTES - len(json.dumps(payload)))  # type: ignore[index]
    body = json.dumps(payload).encode()
    head = (
        f"POST /webhooks/generic HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"webhook-id: {msg_id}\r\nwebhook-timestamp: {timestamp}\r\n"
        f"webhook-signature: {_sign(key, msg_id, timestamp, body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(
    port: int,
    ctx: ssl.SSLContext,
    key: bytes,
    deadline: float,
    latencies: list[float],
    statuses: dict[int, int],
    sent: list[bytes],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        while time.monotonic() < deadline:
            if sent and random.random() < DUPLICATE_SHARE:
                request = random.choice(sent)
            else:
                request = _request(key, port)
                sent.append(request)
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            status = int(head.split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _client(port: int, ca: str, key: bytes, seconds: float, connections: int) -> None:
    ctx = ssl.create_default_context(cafile=ca)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent: list[bytes] = []
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(
            _connection(port, ctx, key, deadline, latencies, statuses, sent)
            for _ in range(connections)
        )
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    print(json.dumps({"latencies": latencies, "statuses": statuses, "cpu": cpu}))


# --- the run ------------------------------------------------------------------------------


def _pgbench_script(body: bytes) -> str:
    from mhv_webhook._store_inbox import ACCEPT_SQL

    values = {
        "$12": "'application/json'",
        "$11": "NULL",
        "$10": "NULL",
        "$9": f"'\\x{body.hex()}'::bytea",
        "$8": '\'{"content-type": "application/json"}\'',
        "$7": "''",
        "$6": "'issue.created'",
        "$5": "('pg-' || :client_id || '-' || :n)",
        "$4": "gen_random_uuid()",
        "$3": "ARRAY['pg-' || :client_id || '-' || :n]::text[]",
        "$2": "ARRAY['delivery_id']::text[]",
        "$1": "'pgbench'",
    }
    sql = ACCEPT_SQL
    for placeholder, value in values.items():  # $11 before $1
        sql = sql.replace(placeholder, value)
    one_line = " ".join(sql.split())
    # One in ten repeats the client's key 0, as the HTTPS clients repeat 10 % of deliveries.
    return (
        "\\set n random(1, 1000000000000)\n"
        "\\if random(1, 10) = 1\n"
        "\\set n 0\n"
        "\\endif\n"
        f"{one_line};\n"
    )


def _pgbench(url: str, seconds: int, clients: int, folder: Path) -> dict[str, float]:
    body = json.dumps({"type": "issue.created", "pad": "x" * (BODY_BYTES - 40)}).encode()
    script = folder / "accept.sql"
    script.write_text(_pgbench_script(body))
    result = subprocess.run(
        [
            "pgbench",
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(seconds),
            "-f",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"pgbench failed:\n{result.stderr[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    latency = float(re.search(r"latency average = ([\d.]+) ms", result.stdout).group(1))  # type: ignore[union-attr]
    return {"tps": tps, "latency_ms": latency}


def _peak_memory_mb(pid: int) -> float:
    """Peak resident memory of a process so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run(args: argparse.Namespace) -> None:
    from bench._env import service_env
    from mhv_cli.devstate import DevState
    from mhv_cli.pgcluster import free_port
    from tests.harness import Cluster, Deployment, Keys, wait_healthy

    folder = Path(tempfile.mkdtemp(prefix="mhv-bench-"))
    cluster = await Cluster.find()
    deployment = await Deployment.create(cluster)
    gateways: list[subprocess.Popen[bytes]] = []
    try:
        pg = _pgbench(deployment.role_url("webhook"), args.seconds, args.pgbench_clients, folder)
        state = DevState(folder / "state")
        state.ensure_tls()
        key = secrets.token_bytes(32)
        keys = Keys.create(folder / "keys")
        ports = {name: free_port() for name in ("grpc", "metrics", "https")}
        sources = folder / "webhooks.yaml"
        sources.write_text("sources:\n  - {name: generic, scheme: standard}\n")
        env = service_env(deployment, keys)
        env.update(
            {
                "MHV_WEBHOOKS_FILE": str(sources),
                "MHV_WEBHOOK_SECRETS_GENERIC": "whsec_" + base64.b64encode(key).decode(),
                "MHV_WEBHOOK_TLS_CERT_FILE": str(state.tls_cert),
                "MHV_WEBHOOK_TLS_KEY_FILE": str(state.tls_key),
                "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(ports["grpc"]),
                "MHV_WEBHOOK_METRICS_PORT": str(ports["metrics"]),
                "MHV_WEBHOOK_HTTPS_PORT": str(ports["https"]),
                # A one-second window: the limiter keeps one entry per request in its window.
                "MHV_RATE_LIMITS": json.dumps(
                    {"webhook": "1000000/second", "webhook_unverified": "1000000/second"}
                ),
                "MHV_LOG_LEVEL": "WARNING",
                "MHV_DB_POOL_MAX_SIZE": "16",
            }
        )
        env["MHV_REUSE_PORT"] = "true" if args.replicas > 1 else "false"
        for i in range(args.replicas):
            log = (folder / f"gateway{i}.log").open("wb")
            grpc_port = ports["grpc"] if i == 0 else free_port()
            replica_env = {
                **env,
                "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(grpc_port),
                "MHV_WEBHOOK_METRICS_PORT": str(ports["metrics"] if i == 0 else free_port()),
            }
            gateways.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mhv_webhook"], env=replica_env, stdout=log, stderr=log
                )
            )
            await wait_healthy(f"127.0.0.1:{grpc_port}", timeout=60)
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--client",
                str(ports["https"]),
                str(state.tls_cert),
                key.hex(),
                str(args.seconds),
                str(args.connections),
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            for _ in range(args.clients)
        ]
        started = time.monotonic()
        cpu_before = sum(_cpu_seconds(g.pid) for g in gateways)
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        client_cpu = 0.0
        for client in clients:
            out, _ = await client.communicate()
            result = json.loads(out)
            latencies += result["latencies"]
            client_cpu += result["cpu"]
            for status, count in result["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
        elapsed = time.monotonic() - started
        gateway_cpu = sum(_cpu_seconds(g.pid) for g in gateways) - cpu_before
        peak_mb = max(_peak_memory_mb(g.pid) for g in gateways)
    finally:
        for gateway in gateways:
            gateway.terminate()
            gateway.wait(30)
        await deployment.drop()
        await cluster.close()
    verified = statuses.get("202", 0) + statuses.get("200", 0)
    rate = verified / args.seconds
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    p50, p99 = q[49] * 1000, q[98] * 1000
    met = rate >= 1500 and p99 <= 50
    lines = [
        f"webhook gateway over HTTPS: {args.clients} client processes x {args.connections}"
        f" connections, {args.seconds} s (wall {elapsed:.1f} s), {os.cpu_count()} cores",
        f"  responses by status:   {dict(sorted(statuses.items()))}",
        f"  verified deliveries/s: {rate:,.0f} (202 accepted + 200 repeats;"
        f" {DUPLICATE_SHARE:.0%} repeats sent)",
        f"  ack latency p50 / p99: {p50:.1f} ms / {p99:.1f} ms",
        f"  gateway CPU:           {gateway_cpu:.1f} s,"
        f" {gateway_cpu / max(verified, 1) * 1000:.2f} ms per verified delivery over"
        f" {args.replicas} process(es) (at most {verified / max(gateway_cpu, 1e-9):,.0f}/s"
        " per fully used core)",
        f"  gateway peak memory:   {peak_mb:.0f} MB (VmHWM of the largest process; goal <= 150)",
        f"  client processes' CPU: {client_cpu:.1f} s (load generation shares the cores)",
        f"pgbench, same claim-and-enqueue SQL: {args.pgbench_clients} clients, {args.seconds} s",
        f"  transactions/s:        {pg['tps']:,.0f} (latency avg {pg['latency_ms']:.2f} ms)",
        f"ratio gateway / pgbench: {rate / pg['tps']:.2f}",
        f"goal >= 1,500/s with p99 <= 50 ms: {'met' if met else 'not met'} on this machine",
    ]
    print("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, ca, key, seconds, connections = sys.argv[2:7]
        asyncio.run(_client(int(port), ca, bytes.fromhex(key), float(seconds), int(connections)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--replicas", type=int, default=1, help="gateway processes on one port")
    parser.add_argument("--connections", type=int, default=16, help="connections per client")
    parser.add_argument("--pgbench-clients", type=int, default=16)
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
