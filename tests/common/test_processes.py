"""MHV_<SERVICE>_PROCESSES: several processes on one port, one /metrics, one drain, restarts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import REGISTRY

from mahavishnu.audit.v1 import audit_pb2, audit_pb2_grpc
from mhv_cli.pgcluster import free_port
from mhv_common.auth import Role
from tests.conftest import Services
from tests.harness import (
    Deployment,
    Keys,
    ServiceProcess,
    bearer,
    grpc_channel,
    service_env,
    task_users_env,
    webhook_env,
)
from tests.webhook.signing import github_headers

pytestmark = pytest.mark.slow

LIST_EVENTS = "ListAuditEvents"
POOL_SIZE = 3


def _children(pid: int) -> set[int]:
    """Live child processes of `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its parenthesis.
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


async def _wait_for(predicate: object, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


Samples = list[tuple[dict[str, str], float]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _samples(text: str, name: str) -> Samples:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def _handled(samples: Samples, method: str) -> float:
    return sum(v for labels, v in samples if labels.get("grpc_method") == method)


def _per_process(folder: Path, pid: int, name: str, tmp: Path) -> Samples:
    """Samples of `name` written by process `pid` alone (its own files in the metrics folder)."""
    own = tmp / f"pid-{pid}"
    own.mkdir(exist_ok=True)
    for file in folder.glob(f"*_{pid}.db"):
        shutil.copy(file, own / file.name)
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry, path=str(own))
    return [
        (sample.labels, sample.value)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


@dataclass
class Supervised:
    """A service started with MHV_<SERVICE>_PROCESSES=2, its metrics folder and its logs."""

    service: ServiceProcess
    metrics_dir: Path

    @property
    def pid(self) -> int:
        assert self.service.process is not None
        return self.service.process.pid

    async def metrics(self) -> str:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{self.service.metrics_port}/metrics"
            return (await client.get(url, timeout=10)).text


def _stale_counts(folder: Path) -> None:
    """What a previous run would leave behind: 1000 ListAuditEvents of a process long gone."""
    stale = MmapedDict(str(folder / "counter_4242424.db"))
    labels = {"grpc_service": "mahavishnu.audit.v1.AuditService", "grpc_method": LIST_EVENTS}
    key = mmap_key(
        "grpc_server_handled_total",
        "grpc_server_handled_total",
        [*labels, "grpc_code"],
        [*labels.values(), "OK"],
        "",
    )
    stale.write_value(key, 1000.0, 0.0)
    stale.close()


@pytest.fixture(scope="module")
async def audit(
    deployment: Deployment,
    keys: Keys,
    services: Services,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Supervised]:
    """The audit service as two processes on one port."""
    folder = Path(tmp_path_factory.mktemp("audit-processes"))
    metrics_dir = folder / "metrics"
    metrics_dir.mkdir()
    _stale_counts(metrics_dir)
    port, metrics_port = free_port(), free_port()
    env = service_env(
        deployment,
        keys,
        {
            "MHV_AUDIT_PROCESSES": "2",
            "MHV_AUDIT_GRPC_PORT": str(port),
            "MHV_AUDIT_METRICS_PORT": str(metrics_port),
            "MHV_AUDIT_VERIFY_INTERVAL_SECONDS": "0",
            "MHV_DB_POOL_MIN_SIZE": "1",
            "MHV_DB_POOL_MAX_SIZE": str(POOL_SIZE),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            **task_users_env(services.task.target, services.ca_file),
        },
    )
    service = ServiceProcess("mhv_audit", env, port, metrics_port, folder / "audit.log")
    await service.start()
    supervised = Supervised(service, metrics_dir)
    await _wait_for(lambda: len(_children(supervised.pid)) == 2)
    yield supervised
    service.stop()


async def _list_on_fresh_connections(target: str, token: str, calls: int) -> None:
    """`calls` ListAuditEvents, each on its own connection (the kernel picks a process)."""
    for _ in range(calls):
        async with grpc_channel(target) as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            await stub.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(page_size=1),
                metadata=bearer(token),
                timeout=10,
                wait_for_ready=True,
            )


async def test_two_processes_serve_one_port_with_one_metrics_endpoint(
    audit: Supervised, keys: Keys, tmp_path: Path
) -> None:
    children = _children(audit.pid)
    assert len(children) == 2
    await _list_on_fresh_connections(audit.service.target, keys.token(Role.AUDITOR), 30)

    # Both processes took connections on the one port...
    for pid in children:
        own = _per_process(audit.metrics_dir, pid, "grpc_server_handled_total", tmp_path)
        assert _handled(own, LIST_EVENTS) > 0, f"process {pid} served nothing"
    # ...and the supervisor's endpoint adds them up: every call, once, and nothing of the
    # stale file a previous run left in the folder.
    text = await audit.metrics()
    assert _handled(_samples(text, "grpc_server_handled_total"), LIST_EVENTS) == 30
    # Per-process gauges add up (livesum), without a pid label; the supervisor's own process
    # metrics are there for the alerts that count from the start time.
    pools = _samples(text, "database_pool_size")
    assert [v for _labels, v in pools] == [2 * POOL_SIZE]
    assert not [labels for labels, _v in pools if "pid" in labels]
    assert _samples(text, "process_start_time_seconds")


async def test_a_killed_process_is_started_again(audit: Supervised, keys: Keys) -> None:
    before = _children(audit.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await _wait_for(lambda: len(_children(audit.pid) - {victim}) == 2, timeout=30)
    await _list_on_fresh_connections(audit.service.target, keys.token(Role.AUDITOR), 5)
    assert audit.service.process is not None
    assert audit.service.process.poll() is None
    # The dead process's gauges left with it: once the new process has opened its pool, the
    # pools of the two live processes are all there is.
    assert not list(audit.metrics_dir.glob(f"gauge_live*_{victim}.db"))
    deadline = time.monotonic() + 30
    while True:
        pools = [v for _labels, v in _samples(await audit.metrics(), "database_pool_size")]
        if pools != [POOL_SIZE] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert pools == [2 * POOL_SIZE]
    assert "a process was killed; starting it again" in audit.service.logs()


async def test_sigterm_drains_every_process(audit: Supervised) -> None:
    children = _children(audit.pid)
    assert len(children) == 2
    assert audit.service.stop(timeout=60) == 0
    assert not [pid for pid in children if _alive(pid)]
    stopped = [
        json.loads(line)
        for line in audit.service.logs().splitlines()
        if line.startswith("{") and json.loads(line)["msg"] == "service stopped"
    ]
    assert len(stopped) == 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", audit.service.grpc_port), timeout=2)


def _run(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mhv_audit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_process_that_exits_by_itself_stops_the_service(
    deployment: Deployment, keys: Keys
) -> None:
    # A socket without SO_REUSEPORT holds the port: no copy can bind it, and each exits 1.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = service_env(
            deployment,
            keys,
            {
                "MHV_AUDIT_PROCESSES": "2",
                "MHV_AUDIT_GRPC_PORT": str(port),
                "MHV_AUDIT_METRICS_PORT": str(free_port()),
                "MHV_DB_POOL_MIN_SIZE": "1",
            },
        )
        result = _run(env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "a process exited on its own; stopping the service" in result.stderr


def test_several_processes_need_a_fixed_port(deployment: Deployment, keys: Keys) -> None:
    env = service_env(deployment, keys, {"MHV_AUDIT_PROCESSES": "2", "MHV_AUDIT_GRPC_PORT": "0"})
    result = _run(env)
    assert result.returncode == 1
    refusal = json.loads(result.stderr.strip().splitlines()[-1])
    assert refusal["error_code"] == "MHV-001"
    assert "MHV_AUDIT_PROCESSES=2 needs a fixed gRPC port" in refusal["reason"]


async def test_the_gateway_serves_https_from_several_processes_that_end_with_it(
    deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    hooks = webhook_env(state)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    https_port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    env = service_env(
        deployment,
        keys,
        {
            **hooks,
            "MHV_WEBHOOK_PROCESSES": "2",
            "MHV_WEBHOOK_ADMIN_GRPC_PORT": str(grpc_port),
            "MHV_WEBHOOK_HTTPS_PORT": str(https_port),
            "MHV_WEBHOOK_METRICS_PORT": str(metrics_port),
            "MHV_DB_POOL_MIN_SIZE": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
    )
    gateway = ServiceProcess("mhv_webhook", env, grpc_port, metrics_port, tmp_path / "wh.log")
    await gateway.start()
    try:
        assert gateway.process is not None
        supervisor = gateway.process.pid
        await _wait_for(lambda: len(_children(supervisor)) == 2)
        context = ssl.create_default_context(cafile=hooks["MHV_WEBHOOK_TLS_CERT_FILE"])
        secret = hooks["MHV_WEBHOOK_SECRETS_GITHUB"]
        statuses = []
        for number in range(16):
            body = json.dumps(
                {
                    "action": "opened",
                    "issue": {"number": number, "title": f"from process test {number}"},
                    "repository": {"full_name": "example/demo"},
                    "sender": {"login": "octocat"},
                }
            ).encode()
            headers = github_headers(secret, body, delivery=str(uuid.uuid4()))
            # A client per request: a new connection, which the kernel hands to either process.
            async with httpx.AsyncClient(verify=context) as client:
                response = await client.post(
                    f"https://localhost:{https_port}/webhooks/github",
                    content=body,
                    headers=headers,
                    timeout=10,
                )
            statuses.append(response.status_code)
        assert statuses == [202] * 16
        for pid in _children(supervisor):
            own = _per_process(metrics_dir, pid, "webhook_requests_total", tmp_path)
            assert sum(v for _labels, v in own) > 0, f"process {pid} answered nothing"
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        answered = _samples(text, "webhook_requests_total")
        assert sum(v for labels, v in answered if labels["code"] == "202") == 16

        # The supervisor dies without a chance to stop its processes: they stop by themselves.
        children = _children(supervisor)
        gateway.kill()
        for _ in range(300):
            if not [pid for pid in children if _alive(pid)]:
                break
            await asyncio.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)]
    finally:
        gateway.stop(timeout=60)


def test_every_gauge_says_how_processes_combine() -> None:
    # A gauge in the default mode ("all") would show one series per process, with a pid label
    # no dashboard or alert expects.
    import mhv_audit.app
    import mhv_task.app
    import mhv_webhook.app

    assert mhv_audit.app and mhv_task.app and mhv_webhook.app
    gauges = [c for c in list(REGISTRY._collector_to_names) if isinstance(c, Gauge)]
    assert gauges
    unset = [g._name for g in gauges if g._multiprocess_mode == "all"]
    assert unset == []
