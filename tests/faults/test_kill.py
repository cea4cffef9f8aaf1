"""SIGKILL from outside of the task service and of the audit service, under load.

Nothing acknowledged is lost or made twice: every CreateTask the ledger holds, sent again with
its request id, answers with the original task; every committed change reaches the audit log
exactly once, in each task's order, and the chain verifies.
"""

from __future__ import annotations

import pytest

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.client import service_channel
from tests.cluster.drill import ALREADY_STARTED, CALL_TIMEOUT, run_fault
from tests.cluster.system import System
from tests.faults.faults import all_alive, killed
from tests.faults.test_postgres import assert_ledger_clean
from tests.harness import bearer

pytestmark = pytest.mark.slow

# Calls cut off by the kill, refused while the port is closed, or retried after the answer was
# lost: all retryable, none an answer of the service itself to the request.
TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "HTTP 503", ALREADY_STARTED}


async def replay_creates(system: System, creates: dict[str, int]) -> dict[str, tuple[int, int]]:
    """CreateTask again for every acknowledged one, same request id: those answered otherwise."""
    different = {}
    async with service_channel(system.peer("task")) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        for title, task_id in creates.items():
            request_id = title.removeprefix("cluster create ")
            again = await stub.CreateTask(
                task_pb2.CreateTaskRequest(title=title, repository="demo", request_id=request_id),
                metadata=bearer(system.token("admin")),
                timeout=CALL_TIMEOUT,
                wait_for_ready=True,
            )
            if again.id != task_id:
                different[title] = (task_id, again.id)
    return different


async def test_task_service_killed_under_load(system: System) -> None:
    report = await run_fault(
        system, killed(system, "task"), warmup=2.0, outage=2.0, settle=1.0, start_tasks=True
    )
    assert set(all_alive(system).values()) == {None}, report
    assert report.errors.get("CreateTask UNAVAILABLE", 0) > 0, report
    assert {e.split(" ", 1)[1] for e in report.errors} <= TRANSIENT, report
    assert_ledger_clean(report)

    # The ledger's requests, retried once more: each answers with the task it made first.
    assert await replay_creates(system, report.ledger.creates) == {}


async def test_audit_service_killed_under_load(system: System) -> None:
    report = await run_fault(
        system, killed(system, "audit"), warmup=2.0, outage=2.0, settle=1.0, start_tasks=True
    )
    assert set(all_alive(system).values()) == {None}, report
    # Task writes never wait for the audit service: no client saw it gone (the one failure
    # allowed is a call slower than its 5 s deadline on a busy machine, retried like any).
    assert {e.split(" ", 1)[1] for e in report.errors} <= {"DEADLINE_EXCEEDED"}, report
    assert_ledger_clean(report)
