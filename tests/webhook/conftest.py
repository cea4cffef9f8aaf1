"""Gateway fixtures: a throw-away TLS certificate, secrets, an in-process edge on a real TLS
socket (with a controllable clock), and the real gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import free_port
from mhv_common.config import WebhookSettings
from mhv_webhook.app import Gateway, build
from tests.conftest import Services
from tests.harness import Deployment, Keys, ServiceProcess, service_env, task_users_env
from tests.webhook.signing import new_github_secret, new_signing_key

T = TypeVar("T")

# Sources of the in-process edge. Rate limits are per source; `limited` is the tight one.
EDGE_SOURCES = """
sources:
  - {name: github, scheme: github, body_cap_bytes: 26214400, rate_limit: 100000/minute}
  - {name: gitlab, scheme: gitlab, rate_limit: 100000/minute}
  - {name: gitlab_signed, scheme: gitlab, rate_limit: 100000/minute}
  - {name: generic, scheme: standard, rate_limit: 100000/minute}
  - {name: rotating, scheme: github, rate_limit: 100000/minute}
  - {name: limited, scheme: standard, rate_limit: 5/minute}
  - {name: guarded, scheme: standard, rate_limit: 3/minute}
  - {name: replayed, scheme: standard, rate_limit: 3/minute}
  - {name: official, scheme: standard, rate_limit: 100000/minute}
"""

# The secret of the Standard Webhooks project's own test vectors.
OFFICIAL_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

# The process gateway declares what `mhv up` declares.
PROCESS_SOURCES = """
sources:
  - {name: github, scheme: github, body_cap_bytes: 26214400}
  - {name: gitlab, scheme: gitlab}
  - {name: generic, scheme: standard}
"""


@dataclass(frozen=True)
class Tls:
    """A self-signed certificate made for this run (it is its own CA)."""

    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    state = DevState(Path(tmp_path_factory.mktemp("gateway-tls")))
    state.ensure_tls()
    return Tls(state.tls_cert, state.tls_key)


@dataclass(frozen=True)
class Secrets:
    """Every secret the test gateways use, by purpose."""

    github: str = field(default_factory=new_github_secret)
    gitlab_token: str = field(default_factory=new_github_secret)
    gitlab_signing: str = field(default_factory=new_signing_key)
    generic: str = field(default_factory=new_signing_key)
    rotating_new: str = field(default_factory=new_github_secret)
    rotating_old: str = field(default_factory=new_github_secret)
    rotating_expired: str = field(default_factory=new_github_secret)

    def edge_environ(self) -> dict[str, str]:
        return {
            "MHV_WEBHOOK_SECRETS_GITHUB": self.github,
            "MHV_WEBHOOK_SECRETS_GITLAB": self.gitlab_token,
            "MHV_WEBHOOK_SECRETS_GITLAB_SIGNED": f"{self.gitlab_token},{self.gitlab_signing}",
            "MHV_WEBHOOK_SECRETS_GENERIC": self.generic,
            "MHV_WEBHOOK_SECRETS_ROTATING": (
                f"{self.rotating_new};id=new,{self.rotating_old},"
                f"{self.rotating_expired};expires=2020-01-01T00:00:00Z;id=retired"
            ),
            "MHV_WEBHOOK_SECRETS_LIMITED": self.generic,
            "MHV_WEBHOOK_SECRETS_GUARDED": self.generic,
            "MHV_WEBHOOK_SECRETS_REPLAYED": self.generic,
            "MHV_WEBHOOK_SECRETS_OFFICIAL": OFFICIAL_SECRET,
        }

    def process_environ(self) -> dict[str, str]:
        return {
            "MHV_WEBHOOK_SECRETS_GITHUB": self.github,
            "MHV_WEBHOOK_SECRETS_GITLAB": self.gitlab_token,
            "MHV_WEBHOOK_SECRETS_GENERIC": self.generic,
        }


@pytest.fixture(scope="session")
def hook_secrets() -> Secrets:
    return Secrets()


class ManualClock:
    """Unix time for the verifiers: the real clock unless a test pins it."""

    def __init__(self) -> None:
        self.pinned: float | None = None

    def __call__(self) -> float:
        return time.time() if self.pinned is None else self.pinned


class EdgeServer:
    """The gateway's HTTPS edge and inbox, in-process on a real TLS socket, in its own thread.

    Running in a thread with its own event loop lets synchronous hypothesis tests talk to it
    over real HTTPS while it serves; `run` executes a coroutine (a SQL check) on its loop.
    """

    def __init__(self, settings: WebhookSettings, environ: dict[str, str], dsn: str) -> None:
        self.settings = settings
        self.environ = environ
        self.dsn = dsn
        self.clock = ManualClock()
        self.port = 0
        self.gateway: Gateway | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._conn: asyncpg.Connection | None = None
        self._thread = threading.Thread(target=self._main, name="edge-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("the edge did not start")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            gateway = build(self.settings, environ=self.environ, clock=self.clock)
            await gateway.db.open()
            gateway.listener.bind()
            self._conn = await asyncpg.connect(self.dsn)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.gateway = gateway
        self.port = gateway.listener.port
        self._ready.set()
        try:
            await gateway.listener.serve(self._stop)
        finally:
            await self._conn.close()
            await gateway.db.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def fetchval(self, sql: str, *args: Any) -> Any:
        assert self._conn is not None
        return self.run(self._conn.fetchval(sql, *args))

    def execute(self, sql: str, *args: Any) -> str:
        assert self._conn is not None
        return self.run(self._conn.execute(sql, *args))

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def edge_settings(deployment: Deployment, tls: Tls, folder: Path, keys: Keys) -> WebhookSettings:
    """Settings of an in-process edge declaring `EDGE_SOURCES` (written into `folder`).

    The gateway signs its own service tokens (saga, revocation checks) with the suite's key.
    """
    sources_file = folder / "webhooks.yaml"
    sources_file.write_text(EDGE_SOURCES)
    return WebhookSettings(
        webhook_database_url=deployment.role_url("webhook"),
        webhooks_file=sources_file,
        webhook_tls_cert_file=tls.cert,
        webhook_tls_key_file=tls.key,
        webhook_https_port=0,
        webhook_body_timeout_seconds=5,
        webhook_workers=0,
        db_pool_min_size=1,
        db_pool_max_size=4,
        # Every test request comes from 127.0.0.1: the address budget must not interfere.
        rate_limits={"webhook_unverified": "100000/minute"},
        auth_signing_key_file=keys.signing_key,
    )


@pytest.fixture(scope="package")
def edge(
    deployment: Deployment,
    keys: Keys,
    tls: Tls,
    hook_secrets: Secrets,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EdgeServer]:
    server = EdgeServer(
        edge_settings(deployment, tls, Path(tmp_path_factory.mktemp("edge")), keys),
        hook_secrets.edge_environ(),
        deployment.role_url("webhook"),
    )
    server.start()
    yield server
    server.close()


@pytest.fixture
def client(edge: EdgeServer, tls: Tls) -> Iterator[httpx.Client]:
    edge.clock.pinned = None
    with httpx.Client(base_url=edge.url, verify=tls.client_context(), timeout=30) as c:
        yield c
    edge.clock.pinned = None


@dataclass
class GatewayProcess:
    """The real gateway process: gRPC admin, HTTPS edge, metrics and jobs."""

    process: ServiceProcess
    https_port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"


def gateway_env(
    deployment: Deployment,
    keys: Keys,
    tls: Tls,
    secrets: Secrets,
    folder: Path,
    **extra: str,
) -> dict[str, str]:
    """Environment of a gateway process declaring `PROCESS_SOURCES` (written into `folder`)."""
    sources_file = folder / "webhooks.yaml"
    sources_file.write_text(PROCESS_SOURCES)
    env = service_env(deployment, keys, secrets.process_environ())
    env.update(
        {
            "MHV_WEBHOOKS_FILE": str(sources_file),
            "MHV_WEBHOOK_TLS_CERT_FILE": str(tls.cert),
            "MHV_WEBHOOK_TLS_KEY_FILE": str(tls.key),
            "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(free_port()),
            "MHV_WEBHOOK_METRICS_PORT": str(free_port()),
            "MHV_WEBHOOK_HTTPS_PORT": str(free_port()),
            "MHV_LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def running_gateway(env: dict[str, str], log: Path) -> AsyncIterator[GatewayProcess]:
    for attempt in range(3):
        process = ServiceProcess(
            "mhv_webhook",
            env,
            int(env["MHV_WEBHOOK_ADMIN_GRPC_PORT"]),
            int(env["MHV_WEBHOOK_METRICS_PORT"]),
            log,
        )
        try:
            await process.start()
            break
        except RuntimeError:
            # A free port found earlier can be taken by another process before the gateway
            # binds it; then, and only then, try again on fresh ports.
            if attempt == 2 or not _lost_a_port(log):
                raise
            env = {**env, **{name: str(free_port()) for name in _GATEWAY_PORTS}}
    try:
        yield GatewayProcess(process, int(env["MHV_WEBHOOK_HTTPS_PORT"]), env)
    finally:
        process.stop()


_GATEWAY_PORTS = (
    "MHV_WEBHOOK_ADMIN_GRPC_PORT",
    "MHV_WEBHOOK_METRICS_PORT",
    "MHV_WEBHOOK_HTTPS_PORT",
)


def _lost_a_port(log: Path) -> bool:
    text = log.read_text(errors="replace")
    return "Address already in use" in text or "cannot bind" in text


@pytest.fixture(scope="package")
async def gateway(
    deployment: Deployment,
    keys: Keys,
    services: Services,
    tls: Tls,
    hook_secrets: Secrets,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[GatewayProcess]:
    folder = Path(tmp_path_factory.mktemp("gateway"))
    # Its admin API checks people against the suite's task service (no saga workers here).
    env = gateway_env(
        deployment,
        keys,
        tls,
        hook_secrets,
        folder,
        MHV_WEBHOOK_GAUGE_INTERVAL_SECONDS="0.5",
        MHV_WEBHOOK_DEDUP_PURGE_INTERVAL_SECONDS="0.5",
        **task_users_env(services.task.target, services.ca_file),
    )
    async with running_gateway(env, folder / "gateway.log") as running:
        yield running


@pytest.fixture
async def webhook_db(deployment: Deployment) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(deployment.role_url("webhook"))
    yield conn
    await conn.close()
