"""`mhv up` (what `make run` calls), end to end, with and without a PostgreSQL configured."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from mhv_cli.migrate import RoleNames, drop_roles
from mhv_cli.pgcluster import free_port
from tests.harness import Cluster, with_database

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
    listed = _grpcurl("-plaintext", task, "list")
    assert listed.returncode == 0, listed.stderr
    assert "mahavishnu.task.v1.TaskService" in listed.stdout
    for port_key, service in (
        ("MHV_AUDIT_GRPC_PORT", "mahavishnu.audit.v1.AuditService"),
        ("MHV_WEBHOOK_ADMIN_GRPC_PORT", "mahavishnu.webhook.v1.WebhookAdminService"),
    ):
        result = _grpcurl("-plaintext", f"127.0.0.1:{env[port_key]}", "list")
        assert service in result.stdout, result.stderr
    # The printed token works as printed: an admin reaches the task service.
    call = _grpcurl(
        "-plaintext",
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
        "-plaintext",
        "-H",
        f"authorization: Bearer {up.token()}",
        "-d",
        json.dumps({"title": "Hello", "repository": "demo"}),
        task,
        "mahavishnu.task.v1.TaskService/CreateTask",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"] == "TASK_STATUS_PENDING"
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
    _check_running_system(up)
    assert up.interrupt() == 0, up.output()[-3000:]
    assert "private PostgreSQL stopped" in up.output()
    # Nothing is left listening.
    ready = subprocess.run(
        [str(_pg_isready()), "-h", "127.0.0.1", "-p", env["MHV_PRIVATE_PG_PORT"]],
        capture_output=True,
        check=False,
    )
    assert ready.returncode != 0


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
        )
        up = Up(env)
        stop_stray.append(up)
        import asyncio

        await asyncio.to_thread(up.wait_ready)
        assert "starting a private PostgreSQL" not in up.output()
        await asyncio.to_thread(_check_running_system, up)
        assert await asyncio.to_thread(up.interrupt) == 0
    finally:
        conn = await asyncpg.connect(cluster.admin_url)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
        await drop_roles(cluster.admin_url, roles=RoleNames(name))
