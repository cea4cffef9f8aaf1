"""Admission control in the real task and audit processes: load over the bound is shed at the
door with a retryable answer, nothing it carried is written, and the service recovers.

The bound (``MHV_MAX_IN_FLIGHT``) is filled by calls held in flight on a table lock, then five
times as many arrive: each is refused at once (UNAVAILABLE, MHV-017, RetryInfo) instead of
queueing behind the held ones. Once the lock goes, the held calls finish, and a shed call sent
again after its advised delay succeeds. The webhook gateway's HTTPS version is in
tests/webhook/test_gateway.py; the figures under load come from ``bench/overload.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio

from mahavishnu.audit.v1 import audit_pb2
from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_common.admission import Admission
from mhv_common.auth import Role
from mhv_common.errors import ServerDrainingError, ServerOverloadedError
from tests import retrying
from tests.audit.support import as_role, event, random_task_id, stub
from tests.draining import assert_shed, locked, private_service
from tests.harness import (
    Deployment,
    Keys,
    ServiceProcess,
    bearer,
    metric,
    rpc_error,
    sample,
    scrape,
)
from tests.task.conftest import make_user
from tests.waiting import wait_until

BOUND = 3
OVER = 5 * BOUND


async def overload(
    deployment: Deployment,
    process: ServiceProcess,
    *,
    service: str,
    table: str,
    send: Callable[[int], Awaitable[object]],
) -> None:
    """Fill `process`'s bound with calls held on `table`, send `OVER` more, then let go.

    Calls are numbered: 0..BOUND-1 are held, BOUND..BOUND+OVER-1 are shed, and the first shed
    one is sent again, as a client would, once the load is gone.
    """
    async with locked(deployment, table):
        held = [asyncio.ensure_future(send(n)) for n in range(BOUND)]

        async def bound_filled() -> bool:
            labels = {"service": service, "listener": "grpc"}
            return await metric(process.metrics_port, "admission_in_flight", labels) >= BOUND

        await wait_until(bound_filled, what="the bound is filled with calls in flight")
        for error in await asyncio.gather(
            *(rpc_error(send(n)) for n in range(BOUND, BOUND + OVER))
        ):
            assert_shed(error)
        # Shedding did not wait for, nor disturb, the calls in progress.
        assert not any(call.done() for call in held)
    await asyncio.gather(*held)
    # Recovered: a shed call sent again after its delay goes through.
    await retrying.rpc(send, BOUND)
    samples = await scrape(process.metrics_port)
    rejected = sample(
        samples,
        "admission_rejections_total",
        {"service": service, "listener": "grpc", "reason": "overloaded"},
    )
    assert rejected >= OVER
    # Shed calls count against availability like any other UNAVAILABLE answer.
    unavailable = sum(
        value
        for (name, labels), value in samples.items()
        if name == "grpc_server_handled_total" and ("grpc_code", "UNAVAILABLE") in labels
    )
    mhv017 = sum(
        value
        for (name, labels), value in samples.items()
        if name == "mhv_errors_total" and ("error_code", "MHV-017") in labels
    )
    assert unavailable >= OVER and mhv017 >= OVER


async def test_task_service_sheds_load_over_its_bound_and_recovers(
    deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    user = await make_user(deployment, f"shed-{uuid.uuid4().hex[:8]}")
    metadata = bearer(keys.token(Role.MEMBER, subject=user))
    run = uuid.uuid4().hex
    process = await private_service(
        deployment, keys, "task", tmp_path, MHV_MAX_IN_FLIGHT=str(BOUND)
    )
    try:
        async with aio.insecure_channel(process.target) as channel:
            tasks = task_pb2_grpc.TaskServiceStub(channel)

            def send(n: int) -> Awaitable[object]:
                request = task_pb2.CreateTaskRequest(
                    title=f"{run} {n}", repository="demo", request_id=f"{run}-{n}"
                )
                return tasks.CreateTask(request, metadata=metadata, timeout=60)  # type: ignore[no-any-return]

            await overload(deployment, process, service="task", table="task.tasks", send=send)
    finally:
        process.stop()
    titles = await deployment.fetch(
        "SELECT title FROM task.tasks WHERE title LIKE $1 ORDER BY title", f"{run} %"
    )
    # The held calls and the one resent, each once; nothing of the shed ones.
    assert sorted(r["title"] for r in titles) == sorted(f"{run} {n}" for n in range(BOUND + 1))


async def test_audit_service_sheds_load_over_its_bound_and_recovers(
    deployment: Deployment, keys: Keys, tmp_path: Path
) -> None:
    ids = [random_task_id() for _ in range(BOUND + OVER)]
    process = await private_service(
        deployment, keys, "audit", tmp_path, MHV_MAX_IN_FLIGHT=str(BOUND)
    )
    try:
        async with aio.insecure_channel(process.target) as channel:
            audit = stub(channel)
            event_ids = [str(uuid.uuid4()) for _ in ids]

            def send(n: int) -> Awaitable[object]:
                request = audit_pb2.RecordEventsRequest(
                    events=[event(ids[n], event_id=event_ids[n])]
                )
                return audit.RecordEvents(  # type: ignore[no-any-return]
                    request, metadata=as_role(keys, Role.SERVICE), timeout=60
                )

            await overload(
                deployment, process, service="audit", table="audit.task_audit_log", send=send
            )
    finally:
        process.stop()
    stored = await deployment.fetch(
        "SELECT task_id FROM audit.task_audit_log WHERE task_id = ANY($1::bigint[])", ids
    )
    assert sorted(r["task_id"] for r in stored) == sorted(ids[: BOUND + 1])


# --- the door itself -------------------------------------------------------------------------


def test_the_door_admits_up_to_its_bound_and_refuses_while_draining() -> None:
    door = Admission(service="unit", listener="test", max_in_flight=2)
    with door.admit(), door.admit():
        with pytest.raises(ServerOverloadedError) as shed, door.admit():
            pass
        assert shed.value.retry_after is not None and shed.value.retry_after > 0
        assert door.in_flight == 2
    assert door.in_flight == 0
    with door.admit():
        door.drain()
        with pytest.raises(ServerDrainingError), door.admit():
            pass
    assert door.in_flight == 0


async def test_idle_waits_for_the_requests_in_progress() -> None:
    door = Admission(service="unit", listener="test", max_in_flight=0)
    assert await door.idle(timeout=0)
    release = asyncio.Event()

    async def request() -> None:
        with door.admit():
            await release.wait()

    running = asyncio.ensure_future(request())
    await wait_until(lambda: door.in_flight == 1, what="the request is admitted")
    assert not await door.idle(timeout=0.01)
    release.set()
    assert await door.idle(timeout=30)
    await running
