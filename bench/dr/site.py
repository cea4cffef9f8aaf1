"""The system a drill runs against: primary, backup repository, WAL receiver, services.

Everything lives in one temporary folder: a private PostgreSQL (a build with its contrib
modules when one is installed, for amcheck) configured as a primary whose commits wait for the
repository's WAL receiver, the Barman repository with its receiver, and the task, audit and
webhook services as separate processes over TLS, as `mhv up` runs them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.backup import PRIMARY_SETTINGS, Connection, Repository
from mhv_cli.devstate import DevState
from mhv_cli.migrate import SERVICE_SLICES, RoleNames, migrate_up
from mhv_cli.pgcluster import PrivateCluster, contrib_bin_dir, free_port
from mhv_common.auth import Role
from tests.harness import (
    Cluster,
    Deployment,
    Keys,
    ServiceProcess,
    bearer,
    ports_env,
    service_env,
    start_order_ports,
    webhook_env,
)

DATABASE = "mahavishnu"
ROOT = Path(__file__).resolve().parents[2]


_STARTED = time.monotonic()


def say(message: str) -> None:
    """Progress on stderr (stdout carries the JSON result only)."""
    print(f"test-dr [{time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class Site:
    """One deployment under test."""

    root: Path
    cluster: PrivateCluster
    repo: Repository
    roles: RoleNames
    passwords: dict[str, str]
    keys: Keys
    tls: DevState
    ports: dict[str, int]
    anchors: Path
    webhook_secret: str = ""
    user_id: str = ""
    receiver: subprocess.Popen[bytes] | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path) -> Site:
        """Lay out the folder (nothing runs yet)."""
        suffix = secrets.token_hex(3)
        cluster = PrivateCluster(
            root / "primary",
            free_port(),
            settings=dict(PRIMARY_SETTINGS),
            bin_dir=contrib_bin_dir(),
        )
        tls = DevState(root / "tls")
        tls.ensure_grpc_tls()
        return cls(
            root=root,
            cluster=cluster,
            repo=Repository(root / "backup", "mahavishnu"),
            roles=RoleNames(f"mhvdr_{suffix}"),
            passwords={s: secrets.token_urlsafe(16) for s in SERVICE_SLICES},
            keys=Keys.create(root / "keys"),
            tls=tls,
            ports=start_order_ports(),
            anchors=root / "audit-anchors.jsonl",
        )

    @property
    def admin_url(self) -> str:
        """Superuser URL of the application database."""
        return self.cluster.url(DATABASE)

    def deployment(self) -> Deployment:
        """The harness's view of the database, for the services' environment."""
        return Deployment(Cluster(self.cluster.url()), DATABASE, self.roles, self.passwords)

    # --- database -----------------------------------------------------------------------

    async def start_database(self) -> None:
        """Start the primary (initialising it the first time)."""
        await asyncio.to_thread(self.cluster.start, timeout=1800)

    async def init(self) -> None:
        """First start: repository, receiver, database, migrations, the drill's user."""
        await self.start_database()
        self.repo.init(Connection.from_url(self.admin_url))
        await self.start_receiver()
        conn = await asyncpg.connect(self.cluster.url())
        try:
            await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        await migrate_up(self.admin_url, roles=self.roles, passwords=self.passwords)
        conn = await asyncpg.connect(self.admin_url)
        try:
            self.user_id = str(
                await conn.fetchval(
                    "INSERT INTO task.users (username, email, display_name) VALUES"
                    " ('drill', 'drill@example.org', 'Drill') RETURNING id"
                )
            )
        finally:
            await conn.close()

    def mhv_env(self) -> dict[str, str]:
        """The environment an operator of this site runs `mhv` with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MHV_")}
        env.update(
            MHV_BACKUP_HOME=str(self.repo.home),
            MHV_BACKUP_SERVER=self.repo.server,
            MHV_AUDIT_ANCHORS_FILE=str(self.anchors),
        )
        return env

    async def start_receiver(self) -> None:
        """Start `mhv backup receive` and wait until the primary streams to it synchronously."""
        with (self.root / "receive.log").open("ab") as log:
            self.receiver = subprocess.Popen(
                [str(Path(sys.executable).with_name("mhv")), "backup", "receive"],
                env=self.mhv_env(),
                stdout=log,
                stderr=log,
            )
        await asyncio.to_thread(self.repo.wait_streaming, timeout=120)

    def stop_receiver(self) -> None:
        """Stop `mhv backup receive` (SIGTERM: it stops its pg_receivewal)."""
        if self.receiver is None:
            return
        self.receiver.terminate()
        try:
            self.receiver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.receiver.kill()
            self.receiver.wait()
            self.repo.barman("receive-wal", "--stop", self.repo.server, check=False)
        self.receiver = None

    def kill_primary(self) -> None:
        """SIGKILL the postmaster, then delete its data folder: the primary's disk is gone."""
        pid = int((self.cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        # Backends notice their postmaster is gone and exit on their own.
        shutil.rmtree(self.cluster.data_dir)

    # --- services -----------------------------------------------------------------------

    def _service_env(self) -> dict[str, str]:
        ports = self.ports
        common = {
            **ports_env(ports),
            "MHV_GRPC_TLS_CA_FILE": str(self.tls.grpc_ca),
            "MHV_WEBHOOK_WORKERS": "2",
            **webhook_env(self.root / "webhook"),
        }
        self.webhook_secret = common["MHV_WEBHOOK_SECRETS_GITHUB"]
        return service_env(self.deployment(), self.keys, common)

    async def start_services(self) -> None:
        """Start audit, task and webhook; return when each reports healthy."""
        env = self._service_env()
        started = []
        for service in ("audit", "task", "webhook"):
            process = ServiceProcess(
                f"mhv_{service}",
                {
                    **env,
                    "MHV_GRPC_TLS_CERT_FILE": str(self.tls.grpc_cert(service)),
                    "MHV_GRPC_TLS_KEY_FILE": str(self.tls.grpc_key(service)),
                },
                self.ports[f"{service}_grpc"],
                self.ports[f"{service}_metrics"],
                self.root / f"{service}.log",
                ca_file=self.tls.grpc_ca,
            )
            self.services[service] = process
            started.append(process.start(timeout=120))
        # All three at once: each retries its calls to the others until they answer.
        await asyncio.gather(*started)

    async def stop_services(self) -> None:
        """SIGTERM every service (killed if it does not exit in time)."""
        for service in ("webhook", "task", "audit"):
            process = self.services.pop(service, None)
            if process is not None:
                await asyncio.to_thread(process.stop, timeout=20)

    def task_channel(self) -> aio.Channel:
        """A TLS channel to the task service."""
        tls = grpc.ssl_channel_credentials(root_certificates=self.tls.grpc_ca.read_bytes())
        return aio.secure_channel(f"127.0.0.1:{self.ports['task_grpc']}", tls)

    def token(self) -> str:
        """A member token of the drill's user."""
        return self.keys.token(Role.MEMBER, subject=self.user_id, ttl_seconds=3 * 3600)

    async def first_write(self, *, timeout: float = 120) -> float:
        """Retry CreateTask until one succeeds; return when it did (monotonic seconds)."""
        deadline = time.monotonic() + timeout
        async with self.task_channel() as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            while True:
                try:
                    await stub.CreateTask(
                        task_pb2.CreateTaskRequest(
                            title="Probe after recovery",
                            repository="demo",
                            request_id=str(uuid.uuid4()),
                        ),
                        metadata=bearer(self.token()),
                        timeout=5,
                    )
                    return time.monotonic()
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Stop everything this site started."""
        await self.stop_services()
        self.stop_receiver()
        await asyncio.to_thread(self.cluster.stop, mode="immediate")


async def wait_until(check: object, *, timeout: float, interval: float = 0.2) -> None:
    """Await `check()` (a coroutine function returning bool) until true, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(interval)
