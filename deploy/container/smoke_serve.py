"""Serve from the built image: migrate, then a service probed and stopped as Kubernetes would.

Usage: ``.venv/bin/python deploy/container/smoke_serve.py BUNDLE`` (deploy/container/
build-image.sh, after it unpacked the image into BUNDLE). Needs root (runc) and a PostgreSQL
administrator URL, ``MHV_SMOKE_DATABASE_URL`` (default: the server on 127.0.0.1:5432 as
``postgres``); it creates a database and roles of its own and drops them at the end.

1. ``mhv migrate`` runs in the image (user 65532, read-only root) against a new database.
2. The audit service runs in the image with TLS, its own role's URL and the plaintext health
   port, as the manifests configure it.
3. From outside: the health port answers readiness (``""``) and ``liveness`` SERVING in
   plaintext; the gRPC port answers over TLS only, for the name ``mahavishnu-audit``; /metrics
   answers.
4. SIGTERM, as the kubelet sends it: the process exits 0 within its drain time.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke_config import write_config

from mhv_cli.devstate import DevState, role_url
from mhv_cli.migrate import RoleNames, drop_roles
from mhv_common.probes import LIVENESS

IMAGE_UID = 65532
SERVING = health_pb2.HealthCheckResponse.SERVING


def say(message: str) -> None:
    """Report progress as build-image.sh does."""
    print(f"image: {message}", flush=True)


def free_port() -> int:
    """A port free on the loopback address now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def runc(bundle: Path, name: str, *, background: bool = False) -> subprocess.Popen[bytes]:
    """Run the bundle's process as container `name`; wait for it unless `background`."""
    process = subprocess.Popen(
        ["runc", "run", "--bundle", str(bundle), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    if not background:
        process.wait(timeout=300)
    return process


def health(port: int, service: str, *, tls: grpc.ChannelCredentials | None = None) -> int:
    """The status `port` answers for `service`, in plaintext or over TLS to mahavishnu-audit."""
    target = f"127.0.0.1:{port}"
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(
            target, tls, options=[("grpc.ssl_target_name_override", "mahavishnu-audit")]
        )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(reply.status)


def wait_serving(port: int, process: subprocess.Popen[bytes], timeout: float) -> float:
    """Seconds until `port` says SERVING for readiness."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise SystemExit("error: the service exited before it was ready")
        try:
            if health(port, "") == SERVING:
                return time.monotonic() - start
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("error: the service did not become ready")


async def create_database(admin: str, database: str) -> None:
    """Create `database` on the server of `admin`."""
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()


async def drop_database(admin: str, database: str, roles: RoleNames) -> None:
    """Drop `database` and the roles the migrations created."""
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await conn.close()
    await drop_roles(admin, roles=roles)


def main(bundle: Path) -> int:
    """Migrate, serve, probe and stop; exit non-zero on anything unexpected."""
    admin = os.environ.get(
        "MHV_SMOKE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    suffix = secrets.token_hex(4)
    database, roles = f"mhv_image_smoke_{suffix}", RoleNames(f"smoke{suffix}")
    password = secrets.token_hex(16)
    state_dir = Path(tempfile.mkdtemp(prefix="mhv-image-smoke-"))
    asyncio.run(create_database(admin, database))
    db_admin = admin.rsplit("/", 1)[0] + f"/{database}"
    try:
        # Keys and certificates as the installer would create them, readable by the image's user.
        state = DevState(state_dir)
        state.ensure_keys("admin-1")
        state.ensure_grpc_tls(("audit",))
        for path in [state_dir, *state_dir.rglob("*")]:
            os.chown(path, IMAGE_UID, IMAGE_UID)

        say("running the image with: mhv migrate")
        write_config(
            bundle,
            ["mhv", "migrate"],
            env={
                "MHV_DATABASE_URL": db_admin,
                "MHV_DB_ROLE_PREFIX": roles.prefix,
                "MHV_DB_PASSWORD_AUDIT": password,
            },
            host_network=True,
        )
        migrate = runc(bundle, f"mahavishnu-migrate-{suffix}")
        output = migrate.stdout.read().decode() if migrate.stdout else ""
        print("    " + output.strip().replace("\n", "\n    "))
        if migrate.returncode != 0:
            raise SystemExit(f"error: mhv migrate exited {migrate.returncode}")

        grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
        tls = "/etc/mahavishnu/tls"
        write_config(
            bundle,
            ["audit"],
            env={
                "MHV_BIND_HOST": "127.0.0.1",
                "MHV_METRICS_HOST": "127.0.0.1",
                "MHV_AUDIT_GRPC_PORT": str(grpc_port),
                "MHV_AUDIT_METRICS_PORT": str(metrics_port),
                "MHV_HEALTH_PORT": str(health_port),
                "MHV_AUDIT_DATABASE_URL": role_url(db_admin, roles.for_slice("audit"), password),
                "MHV_GRPC_TLS_CERT_FILE": f"{tls}/grpc-audit.pem",
                "MHV_GRPC_TLS_KEY_FILE": f"{tls}/grpc-audit-key.pem",
                "MHV_AUTH_JWKS_FILE": "/etc/mahavishnu/keys/jwks.json",
            },
            mounts={state_dir / "tls": tls, state_dir / "keys": "/etc/mahavishnu/keys"},
            host_network=True,
        )
        say("running the image with: audit (then probing it, then SIGTERM)")
        name = f"mahavishnu-audit-{suffix}"
        service = runc(bundle, name, background=True)
        try:
            ready = wait_serving(health_port, service, timeout=60)
            say(f"  ready after {ready:.1f} s; readiness and liveness on the plaintext port:")
            statuses = [health(health_port, s) for s in ("", LIVENESS)]
            credentials = grpc.ssl_channel_credentials(state.grpc_ca.read_bytes())
            over_tls = health(grpc_port, "", tls=credentials)
            try:
                health(grpc_port, "")
                plaintext = "answered (wrong)"
            except grpc.RpcError as exc:
                plaintext = f"refused ({exc.code().name})"
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                metrics = response.read().decode()
            say(
                f"  readiness {health_pb2.HealthCheckResponse.ServingStatus.Name(statuses[0])}, "
                f"liveness {health_pb2.HealthCheckResponse.ServingStatus.Name(statuses[1])}, "
                f"gRPC over TLS {health_pb2.HealthCheckResponse.ServingStatus.Name(over_tls)}, "
                f"gRPC in plaintext {plaintext}, /metrics {len(metrics.splitlines())} lines"
            )
            if statuses != [SERVING, SERVING] or over_tls != SERVING or "answered" in plaintext:
                raise SystemExit("error: the service does not answer as the manifests expect")
        finally:
            sent = time.monotonic()
            subprocess.run(["runc", "kill", name, "TERM"], check=False)
            try:
                code = service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                subprocess.run(["runc", "kill", name, "KILL"], check=False)
                code = service.wait()
            stopped = time.monotonic() - sent
            subprocess.run(["runc", "delete", "--force", name], check=False, capture_output=True)
            logs = service.stdout.read().decode() if service.stdout else ""
        say(f"  SIGTERM: exited {code} after {stopped:.1f} s")
        if code != 0 or '"msg": "service stopped"' not in logs:
            print(logs[-3000:])
            raise SystemExit("error: the service did not stop cleanly")
    finally:
        asyncio.run(drop_database(admin, database, roles))
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))
