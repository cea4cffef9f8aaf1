"""`mhv up`: the whole system on one machine, in the foreground, stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mhv_cli import devstate
from mhv_cli.backup import PRIMARY_SETTINGS, Connection, Repository, barman_binary
from mhv_cli.main import issuer, role_names
from mhv_cli.migrate import migrate_up
from mhv_common.auth import Role
from mhv_common.client import Peer, service_channel
from mhv_common.config import (
    AuditSettings,
    CommonSettings,
    TaskSettings,
    WebhookSettings,
    load_settings,
    redact_dsn,
)
from mhv_common.errors import ConfigurationError
from mhv_common.tls import channel_credentials, is_loopback

HEALTH_TIMEOUT_SECONDS = 60.0
ADMIN_USERNAME = "admin"


@dataclass
class Child:
    """A service process started by `mhv up`."""

    name: str
    module: str
    grpc_port: int
    process: asyncio.subprocess.Process | None = None


# Looked up here, in the parent: between fork and exec the child should only make the call.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _stop_with(parent: int) -> Callable[[], None]:
    """For a service process before exec: SIGTERM it when `mhv up` dies, even by SIGKILL."""

    def preexec() -> None:
        if _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            os._exit(70)
        if os.getppid() != parent:  # the parent died before the call above: do not start
            os._exit(70)

    return preexec


def _say(message: str) -> None:
    print(f"mhv: {message}", flush=True)


async def _ensure_database(cluster_url: str, name: str) -> None:
    conn = await asyncpg.connect(cluster_url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def ensure_admin_user(admin_url: str) -> str:
    """Create the user ``admin`` unless it exists; return its id."""
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(
            "INSERT INTO task.users (username, email, display_name) VALUES ($1, $2, $3)"
            " ON CONFLICT (username) DO NOTHING",
            ADMIN_USERNAME,
            "admin@localhost",
            "Administrator",
        )
        return str(
            await conn.fetchval("SELECT id FROM task.users WHERE username = $1", ADMIN_USERNAME)
        )
    finally:
        await conn.close()


async def wait_healthy(
    peer: Peer, *, timeout: float, alive: Callable[[], bool] = lambda: True
) -> bool:
    """Poll the gRPC health service of `peer` until it reports SERVING.

    Gives up early once `alive` says the process behind it is gone.
    """
    deadline = time.monotonic() + timeout
    async with service_channel(peer) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and alive():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.2)
    return False


# What each service may know, beyond the shared settings: its own database role's URL, its
# own gRPC TLS key, its own signing key if it calls other services, and (the gateway only) the
# webhook secrets and HTTPS key. Nothing else: in particular never the administrator database
# URL, and never the key of the CA that issued the gRPC certificates.
_PRIVATE_PREFIXES = (
    "MHV_DATABASE_URL",
    "MHV_TASK_DATABASE_URL",
    "MHV_AUDIT_DATABASE_URL",
    "MHV_WEBHOOK_DATABASE_URL",
    "MHV_DB_PASSWORD_",
    "MHV_AUTH_SIGNING_KEY_",
    "MHV_WEBHOOK_SECRETS_",
    "MHV_WEBHOOK_TLS_",
)


def _child_env(
    service: str,
    state: devstate.DevState,
    admin_url: str,
    secrets: dict[str, object],
    targets: dict[str, str],
) -> dict[str, str]:
    """The environment of one service process: shared settings and only its own secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_PREFIXES)}
    # Where the other services listen, as started here (unless the operator points elsewhere).
    for name, target in targets.items():
        env.setdefault(name, target)
    passwords = secrets["db_passwords"]
    assert isinstance(passwords, dict)
    own_url = f"MHV_{service.upper()}_DATABASE_URL"
    urls = devstate.database_urls(admin_url, role_names(), passwords)
    env[own_url] = os.environ.get(own_url) or urls[own_url]
    env.setdefault("MHV_AUTH_JWKS_FILE", str(state.jwks))
    # gRPC over TLS with the service's own certificate from the local CA.
    env["MHV_GRPC_TLS_CERT_FILE"] = str(state.grpc_cert(service))
    env["MHV_GRPC_TLS_KEY_FILE"] = str(state.grpc_key(service))
    env["MHV_GRPC_TLS_CA_FILE"] = str(state.grpc_ca)
    if service in devstate.SERVICE_KEY_IDS:
        # A key given in the environment is the operator's choice; else the service's own.
        given = {k: v for k, v in os.environ.items() if k.startswith("MHV_AUTH_SIGNING_KEY_")}
        env.update(
            given
            or {
                "MHV_AUTH_SIGNING_KEY_FILE": str(state.service_key(service)),
                "MHV_AUTH_SIGNING_KEY_ID": devstate.SERVICE_KEY_IDS[service],
            }
        )
    if service == "webhook":
        env["MHV_WEBHOOK_TLS_CERT_FILE"] = os.environ.get(
            "MHV_WEBHOOK_TLS_CERT_FILE", str(state.tls_cert)
        )
        env["MHV_WEBHOOK_TLS_KEY_FILE"] = os.environ.get(
            "MHV_WEBHOOK_TLS_KEY_FILE", str(state.tls_key)
        )
        hooks = secrets["webhook_secrets"]
        assert isinstance(hooks, dict)
        # Generated secrets, each overridden by one the operator gives (who may add sources).
        env.update({f"MHV_WEBHOOK_SECRETS_{s.upper()}": str(v) for s, v in hooks.items()})
        env.update({k: v for k, v in os.environ.items() if k.startswith("MHV_WEBHOOK_SECRETS_")})
    return env


async def run_up() -> int:
    """Start everything, wait for health, print how to call it, run until interrupted."""
    settings = load_settings(CommonSettings)
    task_settings = load_settings(TaskSettings)
    audit_settings = load_settings(AuditSettings)
    webhook_settings = load_settings(WebhookSettings)
    given = sorted(k for k in os.environ if k.startswith("MHV_GRPC_TLS_"))
    if given:
        # One set of variables would give every service the same key, or a CA that did not
        # issue the certificates: run the services directly to use your own PKI.
        raise ConfigurationError(
            f"mhv up issues each service its own gRPC certificate from its local CA and does "
            f"not take {', '.join(given)}; unset them, or start the services yourself with "
            "per-service MHV_GRPC_TLS_* settings."
        )
    state = devstate.DevState(devstate.home())
    cluster = None
    backups: Backups | None = None
    admin_url = os.environ.get("MHV_DATABASE_URL", "")
    if not admin_url:
        cluster = state.cluster()
        repo = _backup_repository()
        if repo is not None:
            cluster.settings.update(PRIMARY_SETTINGS)
        _say(
            f"MHV_DATABASE_URL is unset: starting a private PostgreSQL on 127.0.0.1:"
            f"{cluster.port} (data in {cluster.root})"
        )
        await asyncio.to_thread(cluster.start)
        if repo is not None:
            # Before any write: every commit waits for this receiver.
            backups = await Backups.start(repo, cluster.url("mahavishnu"))
        await _ensure_database(cluster.url("postgres"), "mahavishnu")
        admin_url = cluster.url("mahavishnu")
    _say(f"database: {redact_dsn(admin_url)}")
    secrets = state.secrets()
    if settings.auth_signing_key_file is None:
        state.ensure_keys(settings.auth_signing_key_id)
    if webhook_settings.webhook_tls_cert_file is None:
        state.ensure_tls()
    state.ensure_grpc_tls()
    tls = channel_credentials(state.grpc_ca)
    applied = await migrate_up(admin_url, roles=role_names(), passwords=secrets["db_passwords"])
    _say(f"migrations: {len(applied)} applied")
    await ensure_admin_user(admin_url)
    state.write_state(database_url=admin_url, role_prefix=role_names().prefix)

    # The services call each other where this command starts them: a moved port moves the call.
    local = _reachable_host(settings.bind_host)
    targets = {
        "MHV_TASK_TARGET": f"{local}:{task_settings.task_grpc_port}",
        "MHV_AUDIT_TARGET": f"{local}:{audit_settings.audit_grpc_port}",
    }
    children = [
        Child("audit", "mhv_audit", audit_settings.audit_grpc_port),
        Child("task", "mhv_task", task_settings.task_grpc_port),
        Child("webhook", "mhv_webhook", webhook_settings.webhook_admin_grpc_port),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for child in children:
            child.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                child.module,
                env=_child_env(child.name, state, admin_url, secrets, targets),
                preexec_fn=_stop_with(os.getpid()),
            )
        for child in children:
            process = child.process
            assert process is not None
            healthy = await wait_healthy(
                Peer(f"{local}:{child.grpc_port}", tls, f"mahavishnu-{child.name}"),
                timeout=HEALTH_TIMEOUT_SECONDS,
                alive=lambda p=process: p.returncode is None and not stop.is_set(),  # type: ignore[misc]
            )
            if not healthy:
                _say(f"{child.name} service did not become healthy; stopping")
                return 1
        token = issuer(settings).issue(
            subject=await ensure_admin_user(admin_url),
            roles=[Role.ADMIN],
            ttl_seconds=3600,
            username=ADMIN_USERNAME,
        )
        _print_ready(
            settings, task_settings, audit_settings, webhook_settings, token, ca_file=state.grpc_ca
        )
        if backups is not None:
            backups.print_ready()
        while not stop.is_set():
            if any(c.process is not None and c.process.returncode is not None for c in children):
                _say("a service exited; stopping the others")
                return 1
            if backups is not None and not backups.alive():
                _say("the WAL receiver exited (commits would wait for it); stopping")
                return 1
            if backups is not None:
                backups.maintain_when_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        _say("stopping")
        return 0
    finally:
        for child in children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            if child.process is None:
                continue
            try:
                await asyncio.wait_for(
                    child.process.wait(), timeout=settings.shutdown_grace_seconds + 5
                )
            except TimeoutError:
                child.process.kill()
                await child.process.wait()
        if backups is not None:
            await asyncio.to_thread(backups.stop)
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
            _say("private PostgreSQL stopped")


def _backup_repository() -> Repository | None:
    """The private cluster's backup repository, unless ``MHV_BACKUP=off`` or Barman is missing."""
    if os.environ.get("MHV_BACKUP", "on").lower() in ("off", "0", "false", "no"):
        _say("backups off (MHV_BACKUP=off)")
        return None
    try:
        barman_binary()
    except ConfigurationError:
        _say("backups off: Barman is not installed (make backup-tools)")
        return None
    return Repository()


class Backups:
    """The local repository's WAL receiver, exporter and periodic maintenance."""

    MAINTENANCE_INTERVAL_SECONDS = 60.0

    def __init__(
        self,
        repo: Repository,
        receiver: subprocess.Popen[bytes],
        exporter: subprocess.Popen[bytes],
        port: int,
    ) -> None:
        self.repo = repo
        self.receiver = receiver
        self.exporter = exporter
        self.port = port
        self._maintaining: asyncio.Task[None] | None = None
        self._next = time.monotonic() + self.MAINTENANCE_INTERVAL_SECONDS

    @classmethod
    async def start(cls, repo: Repository, url: str) -> Backups:
        """Create the repository if needed, start the receiver and wait until it streams."""
        await asyncio.to_thread(repo.init, Connection.from_url(url))
        receiver = await asyncio.to_thread(repo.start_receiver)
        try:
            await asyncio.to_thread(repo.wait_streaming, timeout=120)
        except BaseException:
            Repository.stop_receiver(receiver)
            raise
        port = int(os.environ.get("MHV_BACKUP_METRICS_PORT", "9104"))
        # Forked from the event loop's own thread: PR_SET_PDEATHSIG follows the forking thread.
        exporter = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "mhv_cli.main", "backup", "exporter", "--port", str(port)],
            env={**os.environ, "MHV_BACKUP_HOME": str(repo.home)},
            stdout=subprocess.DEVNULL,
            preexec_fn=_stop_with(os.getpid()),
        )
        _say(f"backups: WAL streams synchronously into {repo.home}")
        return cls(repo, receiver, exporter, port)

    def alive(self) -> bool:
        """Whether the receiver still runs."""
        return self.receiver.poll() is None

    def maintain_when_due(self) -> None:
        """Archive the streamed WAL and apply retention, once a minute, in the background."""
        if time.monotonic() < self._next or (self._maintaining and not self._maintaining.done()):
            return
        self._next = time.monotonic() + self.MAINTENANCE_INTERVAL_SECONDS
        self._maintaining = asyncio.ensure_future(asyncio.to_thread(self.repo.maintain))

    def print_ready(self) -> None:
        """What the operator can do with the repository."""
        lines = [
            f"Backups: every commit is in {_shown(self.repo.home)} before it is acknowledged.",
            "  .venv/bin/mhv backup run        # a base backup now (then `list`, `info`)",
            "  .venv/bin/mhv restore --destination /tmp/restored   # restore into a new folder",
            f"  backup metrics http://127.0.0.1:{self.port}/metrics",
            "",
        ]
        print("\n".join(lines), flush=True)

    def stop(self) -> None:
        """Stop the exporter and the receiver (after the services: their last commits)."""
        self.exporter.terminate()
        try:
            self.exporter.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.exporter.kill()
            self.exporter.wait()
        Repository.stop_receiver(self.receiver)


def _reachable_host(bind_host: str) -> str:
    """Where a client on this machine reaches a listener bound to `bind_host`."""
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host  # noqa: S104  # nosec B104: compares an address; binds nothing


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _print_ready(
    settings: CommonSettings,
    task: TaskSettings,
    audit: AuditSettings,
    webhook: WebhookSettings,
    token: str,
    *,
    ca_file: Path,
) -> None:
    host = _reachable_host(settings.bind_host)
    transport = f"-cacert {_shown(ca_file)}"
    if not is_loopback(host):
        # The certificates name localhost and 127.0.0.1 besides the service itself.
        transport += " -servername mahavishnu-task"
    lines = [
        "",
        "Mahavishnu is up.",
        f"  task    gRPC  {host}:{task.task_grpc_port}   metrics http://{settings.metrics_host}:"
        f"{task.task_metrics_port}/metrics",
        f"  audit   gRPC  {host}:{audit.audit_grpc_port}   metrics http://{settings.metrics_host}:"
        f"{audit.audit_metrics_port}/metrics",
        f"  webhook gRPC  {host}:{webhook.webhook_admin_grpc_port}   HTTPS https://{host}:"
        f"{webhook.webhook_https_port}/webhooks/{{github,gitlab,generic}}   metrics "
        f"http://{settings.metrics_host}:{webhook.webhook_metrics_port}/metrics",
        "",
        "An admin token (valid 1 hour; `mhv token --username admin --role admin` for another):",
        f"  export TOKEN={token}",
        "",
        "Try it:",
        f"  grpcurl {transport} {host}:{task.task_grpc_port} list",
        f'  grpcurl {transport} -H "authorization: Bearer $TOKEN" '
        f'-d \'{{"title": "Hello", "repository": "demo"}}\' '
        f"{host}:{task.task_grpc_port} mahavishnu.task.v1.TaskService/CreateTask",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)
