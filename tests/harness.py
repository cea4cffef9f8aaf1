"""Test harness: a real PostgreSQL, a throw-away database per test session, keys, processes.

Where the tests find PostgreSQL, in order:

1. ``MHV_TEST_DATABASE_URL`` (an administrator URL of any cluster);
2. a server on 127.0.0.1:5432 reachable as ``postgres`` without a password (skipped when
   ``MHV_TEST_PRIVATE_POSTGRES=1``);
3. otherwise a private cluster from the pip-installed build, started in a temporary folder.

Whichever it is, the suite creates its own database and its own uniquely prefixed roles, and
drops both at the end: it never reads or writes anyone else's data.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from mhv_cli.devstate import database_urls, role_url
from mhv_cli.migrate import SERVICE_SLICES, RoleNames, drop_roles, migrate_up
from mhv_cli.pgcluster import PrivateCluster, free_port
from mhv_common.auth import Role, TokenIssuer, generate_signing_key
from mhv_common.errors import GRPC_DETAILS_METADATA_KEY
from mhv_common.revocation import Revocation

ROOT = Path(__file__).resolve().parents[1]
LOCAL_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
KEY_ID = "test-1"


async def _reachable(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def with_database(url: str, database: str) -> str:
    """`url` pointing at another database of the same cluster."""
    head, _, tail = url.rpartition("/")
    query = ""
    if "?" in tail:
        tail, query = tail.split("?", 1)
        query = "?" + query
    return f"{head}/{database}{query}"


@dataclass
class Cluster:
    """The PostgreSQL cluster the suite uses, and the private one if we had to start it."""

    admin_url: str
    private: PrivateCluster | None = None
    tmpdir: Path | None = None

    @classmethod
    async def find(cls) -> Cluster:
        """Locate or start a cluster (see the module docstring)."""
        explicit = os.environ.get("MHV_TEST_DATABASE_URL")
        if explicit:
            return cls(explicit)
        # MHV_TEST_PRIVATE_POSTGRES=1 behaves as a machine without a server would.
        if os.environ.get("MHV_TEST_PRIVATE_POSTGRES") != "1" and await _reachable(LOCAL_URL):
            return cls(LOCAL_URL)
        return await cls.start_private()

    @classmethod
    async def start_private(cls) -> Cluster:
        """Start a private cluster in a fresh temporary folder."""
        tmp = Path(tempfile.mkdtemp(prefix="mhv-pg-"))
        cluster = PrivateCluster(tmp, free_port())
        await asyncio.to_thread(cluster.start)
        return cls(cluster.url("postgres"), cluster, tmp)

    async def close(self) -> None:
        """Stop and delete the private cluster, if any."""
        if self.private is not None:
            await asyncio.to_thread(self.private.stop, mode="immediate")
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


@dataclass
class Deployment:
    """One migrated database with its own service roles, dropped afterwards."""

    cluster: Cluster
    database: str
    roles: RoleNames
    passwords: dict[str, str]

    @classmethod
    async def create(cls, cluster: Cluster) -> Deployment:
        """Create the database and roles and apply every migration."""
        suffix = secrets.token_hex(4)
        database = f"mhvtest_{suffix}"
        roles = RoleNames(f"mhvtest_{suffix}")
        passwords = {s: secrets.token_urlsafe(16) for s in SERVICE_SLICES}
        conn = await asyncpg.connect(cluster.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()
        deployment = cls(cluster, database, roles, passwords)
        await migrate_up(deployment.admin_url, roles=roles, passwords=passwords)
        return deployment

    @property
    def admin_url(self) -> str:
        """Administrator URL of this deployment's database."""
        return with_database(self.cluster.admin_url, self.database)

    def role_url(self, slice_name: str) -> str:
        """URL of `slice_name`'s own login role."""
        return role_url(
            self.admin_url, self.roles.for_slice(slice_name), self.passwords[slice_name]
        )

    def env(self) -> dict[str, str]:
        """``MHV_<SLICE>_DATABASE_URL`` for the three services."""
        return database_urls(self.admin_url, self.roles, self.passwords)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Rows of one query, run as administrator on a connection of its own."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    async def drop(self) -> None:
        """Drop the database (disconnecting everyone) and the roles."""
        conn = await asyncpg.connect(self.cluster.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()
        await drop_roles(self.cluster.admin_url, roles=self.roles)


@dataclass
class Keys:
    """A token signing key and its JWKS, written to a temporary folder."""

    folder: Path
    signing_key: Path
    jwks: Path
    issuer: TokenIssuer
    # Users standing for each role when a token names no subject (`register_people`): every
    # service refuses a person's token whose user does not exist (mhv_common.revocation).
    people: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path, key_id: str = KEY_ID) -> Keys:
        """Generate a key pair into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        pem, jwk = generate_signing_key()
        jwk["kid"] = key_id
        signing = folder / f"{key_id}.pem"
        signing.write_bytes(pem)
        jwks = folder / f"{key_id}.jwks.json"
        jwks.write_text(json.dumps({"keys": [jwk]}))
        return cls(folder, signing, jwks, TokenIssuer(pem, key_id=key_id))

    def token(self, role: Role | str, subject: str = "", **kwargs: object) -> str:
        """A token for `subject` with one role.

        Without a subject: the registered user of that role (`register_people`), else a random
        user id, which no service accepts for a person.
        """
        import uuid

        return self.issuer.issue(
            subject=subject or self.people.get(str(Role(role))) or str(uuid.uuid4()),
            roles=[role],
            **kwargs,  # type: ignore[arg-type]
        )

    def env(self) -> dict[str, str]:
        """Settings pointing services at these keys."""
        return {
            "MHV_AUTH_JWKS_FILE": str(self.jwks),
            "MHV_AUTH_SIGNING_KEY_FILE": str(self.signing_key),
            "MHV_AUTH_SIGNING_KEY_ID": KEY_ID,
        }


async def make_user(deployment: Deployment, username: str) -> str:
    """A new active user of `deployment` named `username` (its id)."""
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        return str(
            await conn.fetchval(
                "INSERT INTO task.users (username, email) VALUES ($1, $2) RETURNING id",
                username,
                f"{username}@example.test",
            )
        )
    finally:
        await conn.close()


async def make_person(deployment: Deployment, name: str) -> str:
    """A new active user of `deployment` with a unique name after `name` (its id)."""
    return await make_user(deployment, f"{name}-{secrets.token_hex(4)}")


async def register_people(deployment: Deployment, keys: Keys) -> None:
    """One user per person's role in `deployment`, standing for that role in `keys.token`."""
    for role in (Role.ADMIN, Role.MEMBER, Role.VIEWER, Role.AUDITOR):
        if str(role) not in keys.people:
            keys.people[str(role)] = await make_person(deployment, f"{role}-of-the-suite")


async def _anyone_is_active(_user: object) -> bool:
    return True


def anyone_active() -> Revocation:
    """Revocation for a probe service without users: every person counts as active."""
    return Revocation(_anyone_is_active)


def task_users_env(task_target: str, ca_file: Path) -> dict[str, str]:
    """Settings for a process that checks people against the task service at `task_target`."""
    return {"MHV_TASK_TARGET": task_target, "MHV_GRPC_TLS_CA_FILE": str(ca_file)}


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


# Generous limits for the suite; the rate-limit tests run their own servers with tight ones.
RELAXED_LIMITS = json.dumps(
    {
        "create": "100000/minute",
        "search": "100000/minute",
        "general": "100000/minute",
        "webhook": "100000/minute",
        "webhook_unverified": "100000/minute",
    }
)


# Connections per service process. The suite shares its PostgreSQL (max_connections 100 by
# default) with whatever else runs there, and a run has up to a dozen service processes alive
# at once: each may hold this many. A test that needs more says so in its own settings.
POOL_BUDGET = {"MHV_DB_POOL_MIN_SIZE": "1", "MHV_DB_POOL_MAX_SIZE": "4"}


def grpc_channel(target: str, ca_file: Path | None = None) -> aio.Channel:
    """A plaintext channel, or a TLS one trusting only `ca_file`."""
    if ca_file is None:
        return aio.insecure_channel(target)
    tls = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
    return aio.secure_channel(target, tls)


async def wait_healthy(
    target: str, *, timeout: float = 30.0, service: str = "", ca_file: Path | None = None
) -> None:
    """Wait until the gRPC health service at `target` says SERVING."""
    deadline = time.monotonic() + timeout
    async with grpc_channel(target, ca_file) as channel_:
        stub = health_pb2_grpc.HealthStub(channel_)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} did not become healthy")
            await asyncio.sleep(0.1)


def _die_with_parent() -> None:
    # A test run that is killed outright must not leave services running against a database
    # it can no longer drop: the kernel sends SIGTERM to the child when the parent dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class ServiceProcess:
    """A service running as its own OS process, as in production."""

    module: str
    env: dict[str, str]
    grpc_port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None)
    # The CA of its gRPC certificate when it serves TLS (MHV_GRPC_TLS_CERT_FILE).
    ca_file: Path | None = None

    @property
    def target(self) -> str:
        """host:port of its gRPC listener."""
        return f"127.0.0.1:{self.grpc_port}"

    def launch(self) -> None:
        """Start the process without waiting for it (`start` waits until it is healthy)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            stdout=log,
            stderr=log,
            preexec_fn=_die_with_parent,  # prctl only: safe between fork and exec
        )
        log.close()

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the process and wait for it to report healthy."""
        self.launch()
        try:
            await wait_healthy(self.target, timeout=timeout, ca_file=self.ca_file)
        except TimeoutError:
            self.kill()
            raise RuntimeError(
                f"{self.module} failed to start:\n{self.log_path.read_text()[-3000:]}"
            ) from None

    @property
    def drain_seconds(self) -> float:
        """How long the process may take to exit after SIGTERM.

        The door and calls in progress, then background workers, each get the shutdown grace
        (`mhv_common.server`), the webhook's HTTPS listener one more before them; the rest is
        the interpreter starting and ending on a busy machine.
        """
        grace = float(self.env.get("MHV_SHUTDOWN_GRACE_SECONDS", "10"))
        return 3 * grace + 10

    def stop(self, *, timeout: float | None = None) -> int:
        """SIGTERM, and check the process drains and exits with status 0 in its drain time.

        A process that had already ended (a test killed or crashed it on purpose) is not
        checked: its status is returned as it is.

        Args:
            timeout: Seconds to wait for the exit; default `drain_seconds`.

        Raises:
            AssertionError: The process did not exit in time (it is then killed), or exited
                with another status than 0.
        """
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        limit = self.drain_seconds if timeout is None else timeout
        try:
            code = self.process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"{self.module} did not exit within {limit:g} s of SIGTERM:\n{self._tail()}"
            ) from None
        if code != 0:
            raise AssertionError(
                f"{self.module} exited with status {code} after SIGTERM:\n{self._tail()}"
            )
        return code

    def _tail(self) -> str:
        return self.logs()[-3000:]

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")


def stop_all(processes: Sequence[ServiceProcess]) -> None:
    """Stop each process in turn (`ServiceProcess.stop`); then fail for any that did not
    exit cleanly, so that one bad exit neither leaves the others running nor goes unseen."""
    failures = []
    for process in processes:
        try:
            process.stop()
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("\n\n".join(failures))


def service_env(
    deployment: Deployment, keys: Keys, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a service process of this deployment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MHV_", "OTEL_"))}
    # No test process may reach a service on the default ports (a developer's `mhv up`):
    # unless a test names them, downstream targets point at a closed port, and the gateway
    # only receives (no saga workers).
    env["MHV_TASK_TARGET"] = env["MHV_AUDIT_TARGET"] = "127.0.0.1:1"
    env["MHV_WEBHOOK_WORKERS"] = "0"
    env.update(deployment.env())
    env.update(keys.env())
    env["MHV_RATE_LIMITS"] = RELAXED_LIMITS
    env["MHV_DB_ROLE_PREFIX"] = deployment.roles.prefix
    env["MHV_SHUTDOWN_GRACE_SECONDS"] = "5"
    env.update(POOL_BUDGET)
    env.update(extra or {})
    return env


def webhook_env(folder: Path) -> dict[str, str]:
    """A throw-away TLS certificate and secrets for the gateway's default sources."""
    from mhv_cli.devstate import DEFAULT_WEBHOOK_SOURCES, DevState

    state = DevState(folder)
    state.ensure_tls()
    env = {
        "MHV_WEBHOOK_TLS_CERT_FILE": str(state.tls_cert),
        "MHV_WEBHOOK_TLS_KEY_FILE": str(state.tls_key),
    }
    for source, secret in state.secrets()["webhook_secrets"].items():
        if source in DEFAULT_WEBHOOK_SOURCES:
            env[f"MHV_WEBHOOK_SECRETS_{source.upper()}"] = str(secret)
    return env


def start_order_ports() -> dict[str, int]:
    """Free ports for one set of services."""
    return {
        "task_grpc": free_port(),
        "task_metrics": free_port(),
        "audit_grpc": free_port(),
        "audit_metrics": free_port(),
        "webhook_grpc": free_port(),
        "webhook_metrics": free_port(),
        "webhook_https": free_port(),
    }


def ports_env(ports: Mapping[str, int]) -> dict[str, str]:
    """Settings putting one set of services on `ports` and pointing them at each other."""
    return {
        "MHV_TASK_GRPC_PORT": str(ports["task_grpc"]),
        "MHV_TASK_METRICS_PORT": str(ports["task_metrics"]),
        "MHV_AUDIT_GRPC_PORT": str(ports["audit_grpc"]),
        "MHV_AUDIT_METRICS_PORT": str(ports["audit_metrics"]),
        "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(ports["webhook_grpc"]),
        "MHV_WEBHOOK_METRICS_PORT": str(ports["webhook_metrics"]),
        "MHV_WEBHOOK_HTTPS_PORT": str(ports["webhook_https"]),
        "MHV_AUDIT_TARGET": f"127.0.0.1:{ports['audit_grpc']}",
        "MHV_TASK_TARGET": f"127.0.0.1:{ports['task_grpc']}",
    }


def rich_status(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a Mahavishnu server attaches to every error."""
    for key, value in error.trailing_metadata() or ():
        if key == GRPC_DETAILS_METADATA_KEY:
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


def detail(status: status_pb2.Status, kind: type[Any]) -> Any:
    """The first detail of type `kind`, or None."""
    for any_ in status.details:
        if any_.Is(kind.DESCRIPTOR):
            message = kind()
            any_.Unpack(message)
            return message
    return None


def mhv_code(error: grpc.RpcError) -> str:
    """The MHV code in an error's ErrorInfo."""
    info = detail(rich_status(error), error_details_pb2.ErrorInfo)
    assert info is not None, "no ErrorInfo"
    return str(info.metadata["error_code"])


def violations(error: grpc.RpcError) -> dict[str, str]:
    """Field -> description of the BadRequest detail."""
    bad = detail(rich_status(error), error_details_pb2.BadRequest)
    return {v.field: v.description for v in bad.field_violations} if bad else {}


async def rpc_error(call: Any) -> aio.AioRpcError:
    """Await `call`, which must fail, and return its error."""
    try:
        await call
    except aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample on the /metrics endpoint at `port`, by (name, label set)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sample with exactly these labels (0 when absent)."""
    return samples.get((name, frozenset((labels or {}).items())), 0.0)


async def metric(port: int, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The current value of one sample on the /metrics endpoint at `port` (0 when absent)."""
    return sample(await scrape(port), name, labels)
