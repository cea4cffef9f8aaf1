"""`mhv up` (what `make run` calls), end to end, with and without a PostgreSQL configured."""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from mhv_cli.migrate import RoleNames, drop_roles
from mhv_cli.pgcluster import free_port
from tests.harness import Cluster, with_database
from tests.webhook.signing import github_headers

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = Path(sys.executable).parent / "grpcurl"
READY = "Mahavishnu is up."


class Up:
    """A running `mhv up` with its output collected in the background."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mhv_cli.main", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(READY in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"mhv up did not become ready:\n{self.output()[-4000:]}")

    def token(self) -> str:
        line = next(line for line in self.lines if "export TOKEN=" in line)
        return line.split("export TOKEN=", 1)[1].strip()

    def interrupt(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=timeout)
        self.close()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            # As Ctrl-C would: the private PostgreSQL is stopped too. Then no mercy.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MHV_", "OTEL_"))}
    env.update(
        {
            "MHV_HOME": str(tmp_path / "state"),
            "MHV_PRIVATE_PG_PORT": str(free_port()),
            "MHV_TASK_GRPC_PORT": str(free_port()),
            "MHV_TASK_METRICS_PORT": str(free_port()),
            "MHV_AUDIT_GRPC_PORT": str(free_port()),
            "MHV_AUDIT_METRICS_PORT": str(free_port()),
            "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(free_port()),
            "MHV_WEBHOOK_METRICS_PORT": str(free_port()),
            "MHV_WEBHOOK_HTTPS_PORT": str(free_port()),
            "MHV_BACKUP_METRICS_PORT": str(free_port()),
        }
    )
    env.update(extra)
    return env


def _grpcurl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _check_running_system(up: Up) -> None:
    env = up.env
    task = f"127.0.0.1:{env['MHV_TASK_GRPC_PORT']}"
    # gRPC is served over TLS only, with certificates from the state folder's private CA.
    ca = str(Path(env["MHV_HOME"]) / "tls" / "grpc-ca.pem")
    assert f"grpcurl -cacert {ca} 127.0.0.1:{env['MHV_TASK_GRPC_PORT']} list" in up.output()
    assert _grpcurl("-plaintext", task, "list").returncode != 0
    listed = _grpcurl("-cacert", ca, task, "list")
    assert listed.returncode == 0, listed.stderr
    assert "mahavishnu.task.v1.TaskService" in listed.stdout
    for port_key, service in (
        ("MHV_AUDIT_GRPC_PORT", "mahavishnu.audit.v1.AuditService"),
        ("MHV_WEBHOOK_ADMIN_GRPC_PORT", "mahavishnu.webhook.v1.WebhookAdminService"),
    ):
        result = _grpcurl("-cacert", ca, f"127.0.0.1:{env[port_key]}", "list")
        assert service in result.stdout, result.stderr
    # The printed token works as printed: an admin reaches the task service.
    call = _grpcurl(
        "-cacert",
        ca,
        "-H",
        f"authorization: Bearer {up.token()}",
        "-d",
        json.dumps({"page_size": 1}),
        task,
        "mahavishnu.task.v1.UserService/ListUsers",
    )
    assert call.returncode == 0, call.stderr
    assert [u["username"] for u in json.loads(call.stdout)["users"]] == ["admin"]
    # The README's first call works as written: a task in the demo repository.
    created = _grpcurl(
        "-cacert",
        ca,
        "-H",
        f"authorization: Bearer {up.token()}",
        "-d",
        json.dumps({"title": "Hello", "repository": "demo"}),
        task,
        "mahavishnu.task.v1.TaskService/CreateTask",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"] == "TASK_STATUS_PENDING"
    _check_webhook_to_audit(up, ca)
    # `mhv token` finds the deployment through the state folder.
    token = subprocess.run(
        [sys.executable, "-m", "mhv_cli.main", "token", "--username", "admin", "--role", "viewer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert token.returncode == 0, token.stderr
    assert token.stdout.count(".") == 2
    unknown = subprocess.run(
        [
            sys.executable,
            "-m",
            "mhv_cli.main",
            "token",
            "--username",
            "nobody-here",
            "--role",
            "viewer",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unknown.returncode != 0
    assert "[MHV-110]" in unknown.stderr


def _check_webhook_to_audit(up: Up, ca: str) -> None:
    """The README's GitHub delivery becomes a task, and the task's creation an audit record.

    This crosses every service-to-service call over TLS: gateway -> task, task -> audit.
    """
    env = up.env
    state = Path(env["MHV_HOME"])
    secret = json.loads((state / "secrets.json").read_text())["webhook_secrets"]["github"]
    title = f"From GitHub {secrets.token_hex(4)}"
    body = json.dumps(
        {
            "action": "opened",
            "issue": {"number": 1, "title": title, "body": "hello"},
            "repository": {"full_name": "example/demo"},
            "sender": {"login": "octocat"},
        }
    ).encode()
    answer = httpx.post(
        f"https://localhost:{env['MHV_WEBHOOK_HTTPS_PORT']}/webhooks/github",
        content=body,
        headers=github_headers(secret, body, delivery=str(uuid.uuid4())),
        verify=ssl.create_default_context(cafile=str(state / "tls" / "cert.pem")),
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    auth = f"authorization: Bearer {up.token()}"
    task = f"127.0.0.1:{env['MHV_TASK_GRPC_PORT']}"
    audit = f"127.0.0.1:{env['MHV_AUDIT_GRPC_PORT']}"
    deadline = time.monotonic() + 60
    events: list[str] = []
    while time.monotonic() < deadline and "task_created" not in events:
        time.sleep(0.5)
        listed = _grpcurl(
            "-cacert",
            ca,
            "-H",
            auth,
            "-d",
            json.dumps({"page_size": 100}),
            task,
            "mahavishnu.task.v1.TaskService/ListTasks",
        )
        assert listed.returncode == 0, listed.stderr
        ids = [t["id"] for t in json.loads(listed.stdout).get("tasks", []) if t["title"] == title]
        if not ids:
            continue
        found = _grpcurl(
            "-cacert",
            ca,
            "-H",
            auth,
            "-d",
            json.dumps({"task_id": ids[0]}),
            audit,
            "mahavishnu.audit.v1.AuditService/ListAuditEvents",
        )
        assert found.returncode == 0, found.stderr
        events = [e["event_type"] for e in json.loads(found.stdout).get("events", [])]
    assert "task_created" in events, up.output()[-3000:]


@pytest.fixture
def stop_stray(request: pytest.FixtureRequest) -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.close()


@pytest.mark.slow
def test_up_without_database_starts_a_private_postgresql(
    tmp_path: Path, stop_stray: list[Up]
) -> None:
    env = _env(tmp_path)
    up = Up(env)
    stop_stray.append(up)
    up.wait_ready()
    assert "starting a private PostgreSQL" in up.output()
    # `make run` backs its database up: every commit reaches the repository first.
    home = tmp_path / "state" / "backup"
    assert f"backups: WAL streams synchronously into {home}" in up.output()
    _check_running_system(up)
    check = subprocess.run(
        [sys.executable, "-m", "mhv_cli.main", "backup", "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok     receive_wal_running" in check.stdout
    with urllib.request.urlopen(
        f"http://127.0.0.1:{env['MHV_BACKUP_METRICS_PORT']}/metrics", timeout=30
    ) as answer:
        assert "mhv_wal_receiver_streaming 1.0" in answer.read().decode()
    assert up.interrupt() == 0, up.output()[-3000:]
    assert "private PostgreSQL stopped" in up.output()
    # Nothing is left listening.
    ready = subprocess.run(
        [str(_pg_isready()), "-h", "127.0.0.1", "-p", env["MHV_PRIVATE_PG_PORT"]],
        capture_output=True,
        check=False,
    )
    assert ready.returncode != 0


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _wait_gone(pids: list[int], timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in pids if Path(f"/proc/{pid}").exists()]:
            return
        time.sleep(0.2)
    raise AssertionError(f"services still running after mhv up was killed: {pids}")


def _pg_isready() -> Path:
    from mhv_cli.pgcluster import binary

    return binary("pg_isready")


@pytest.mark.slow
async def test_up_with_configured_database(
    tmp_path: Path, cluster: Cluster, stop_stray: list[Up]
) -> None:
    name = f"mhvup_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(cluster.admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        env = _env(
            tmp_path,
            MHV_DATABASE_URL=with_database(cluster.admin_url, name),
            MHV_DB_ROLE_PREFIX=name,
            # As in a container: every interface. Health checks, the services' calls to each
            # other and the printed commands still go to 127.0.0.1, with TLS.
            MHV_BIND_HOST="0.0.0.0",  # noqa: S104
        )
        up = Up(env)
        stop_stray.append(up)
        import asyncio

        await asyncio.to_thread(up.wait_ready)
        assert "starting a private PostgreSQL" not in up.output()
        await asyncio.to_thread(_check_running_system, up)
        # Killed outright, `mhv up` takes its services with it: none is left holding the
        # database or a port.
        children = _children(up.process.pid)
        assert len(children) == 3
        up.process.kill()
        up.process.wait()
        await asyncio.to_thread(_wait_gone, children)
    finally:
        conn = await asyncpg.connect(cluster.admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
        await drop_roles(cluster.admin_url, roles=RoleNames(name))


def test_up_refuses_grpc_tls_settings_it_would_share(tmp_path: Path) -> None:
    # One MHV_GRPC_TLS_KEY_FILE would be every service's key: mhv up issues its own per service.
    env = _env(tmp_path, MHV_GRPC_TLS_KEY_FILE=str(tmp_path / "key.pem"))
    result = subprocess.run(
        [sys.executable, "-m", "mhv_cli.main", "up"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "[MHV-001]" in result.stderr and "MHV_GRPC_TLS_KEY_FILE" in result.stderr
    # Refused before anything started: no private PostgreSQL was created.
    assert not (tmp_path / "state" / "pg").exists()
