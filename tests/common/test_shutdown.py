"""Graceful shutdown of the real task and audit processes, with a call in flight.

On SIGTERM a service turns its health NOT_SERVING, refuses new calls with a retryable
UNAVAILABLE (MHV-016, RetryInfo), lets the call in progress finish and exits with status 0
within its drain time (`mhv_common.server`). The call is kept in flight by a table lock the
test holds: it decides when the call may finish, not a timer. The webhook gateway's version,
with its HTTPS edge, is in tests/webhook/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from mahavishnu.audit.v1 import audit_pb2
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.auth import Role
from tests.audit.support import as_role, event, random_task_id, stub
from tests.draining import (
    assert_draining,
    health_status,
    locked,
    private_service,
    waiting_on_lock,
)
from tests.harness import Deployment, Keys, ServiceProcess, bearer, rpc_error
from tests.task.conftest import make_user
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

# Long enough that the drain never cuts the held call short, however busy the machine.
GRACE_SECONDS = "20"


async def drain_with_a_call_in_flight(
    deployment: Deployment,
    process: ServiceProcess,
    *,
    service: str,
    table: str,
    held: Callable[[], Awaitable[object]],
    new: Callable[[], Awaitable[object]],
) -> object:
    """SIGTERM `process` while `held` waits on `table`; check the order of the shutdown.

    Returns what `held` returned once it was let through.
    """
    assert process.process is not None
    async with aio.insecure_channel(process.target) as channel:
        async with locked(deployment, table):
            in_flight = asyncio.ensure_future(held())
            await wait_until(
                lambda: waiting_on_lock(deployment, service), what="the call waits on the lock"
            )
            process.process.send_signal(signal.SIGTERM)

            async def not_serving() -> bool:
                return await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_until(not_serving, what="health says NOT_SERVING")
            assert_draining(await rpc_error(new()))
            # Still held, still in flight: the refusal did not wait for it, nor cut it off.
            assert not in_flight.done()
        result = await in_flight
    code = await asyncio.to_thread(process.process.wait, process.drain_seconds)
    assert code == 0, process.logs()[-3000:]
    return result


async def test_task_service_finishes_the_call_in_flight_and_refuses_new_ones(
    deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    user = await make_user(deployment, f"drain-{uuid.uuid4().hex[:8]}")
    process = await private_service(
        deployment, keys, "task", tmp_path, MHV_SHUTDOWN_GRACE_SECONDS=GRACE_SECONDS
    )
    metadata = bearer(keys.token(Role.MEMBER, subject=user))
    held_title, refused_title = f"held {uuid.uuid4().hex}", f"refused {uuid.uuid4().hex}"
    try:
        async with aio.insecure_channel(process.target) as channel:
            tasks = task_pb2_grpc.TaskServiceStub(channel)

            def create(title: str) -> Awaitable[task_pb2.Task]:
                request = task_pb2.CreateTaskRequest(title=title, repository="demo")
                return tasks.CreateTask(request, metadata=metadata, timeout=60)  # type: ignore[no-any-return]

            created = await drain_with_a_call_in_flight(
                deployment,
                process,
                service="task",
                table="task.tasks",
                held=lambda: create(held_title),
                new=lambda: create(refused_title),
            )
    finally:
        process.stop()
    assert isinstance(created, task_pb2.Task) and created.title == held_title
    titles = await deployment.fetch(
        "SELECT title FROM task.tasks WHERE title = ANY($1::text[])",
        [held_title, refused_title],
    )
    # The call in flight committed once; the refused one did nothing.
    assert [r["title"] for r in titles] == [held_title]


async def test_audit_service_finishes_the_call_in_flight_and_refuses_new_ones(
    deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    process = await private_service(
        deployment, keys, "audit", tmp_path, MHV_SHUTDOWN_GRACE_SECONDS=GRACE_SECONDS
    )
    held_task, refused_task = random_task_id(), random_task_id()
    try:
        async with aio.insecure_channel(process.target) as channel:
            audit = stub(channel)

            def record(task_id: int) -> Awaitable[object]:
                request = audit_pb2.RecordEventsRequest(
                    events=[event(task_id, event_id=str(uuid.uuid4()))]
                )
                return audit.RecordEvents(  # type: ignore[no-any-return]
                    request, metadata=as_role(keys, Role.SERVICE), timeout=60
                )

            await drain_with_a_call_in_flight(
                deployment,
                process,
                service="audit",
                table="audit.task_audit_log",
                held=lambda: record(held_task),
                new=lambda: record(refused_task),
            )
    finally:
        process.stop()
    stored = await deployment.fetch(
        "SELECT task_id FROM audit.task_audit_log WHERE task_id = ANY($1::bigint[])",
        [held_task, refused_task],
    )
    assert [r["task_id"] for r in stored] == [held_task]


# --- the harness checks every stop: exit status 0 within the drain time ---------------------

_READY = "print('ready', flush=True); time.sleep(120)"
IGNORES_SIGTERM = f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); {_READY}"
FAILS_ON_SIGTERM = (
    f"import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(3)); {_READY}"
)


def _bare_process(code: str, tmp_path: Path) -> ServiceProcess:
    process = ServiceProcess("not-a-service", {}, 0, 0, tmp_path / "bare.log")
    process.process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.process.stdout is not None
    with process.process.stdout:
        assert process.process.stdout.readline() == b"ready\n"  # its handler is installed
    (tmp_path / "bare.log").write_text("")
    return process


def test_the_harness_fails_a_stop_that_does_not_drain_in_time(tmp_path: Path) -> None:
    process = _bare_process(IGNORES_SIGTERM, tmp_path)
    with pytest.raises(AssertionError, match="did not exit within"):
        process.stop(timeout=1)
    assert process.process is not None and process.process.returncode == -signal.SIGKILL


def test_the_harness_fails_a_stop_with_another_status_than_0(tmp_path: Path) -> None:
    process = _bare_process(FAILS_ON_SIGTERM, tmp_path)
    with pytest.raises(AssertionError, match="exited with status 3"):
        process.stop()
