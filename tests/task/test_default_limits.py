"""The plan's default rate limits, on a task service that runs with them.

The suite's services run with relaxed limits (`tests.harness.RELAXED_LIMITS`); this one is
started without ``MHV_RATE_LIMITS``, as a deployment that sets nothing would be: creations 10,
searches 30 and everything else 60 per minute and caller.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from mhv_cli.pgcluster import free_port
from tests.conftest import Services
from tests.harness import ServiceProcess, mhv_code
from tests.task.conftest import People

Call = Callable[[], Awaitable[object]]


@pytest.fixture(scope="module")
async def defaults(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """host:port of a task service with the default limits (its relay off: nothing to send)."""
    port, metrics = free_port(), free_port()
    env = {k: v for k, v in services.env.items() if k != "MHV_RATE_LIMITS"}
    env |= {
        "MHV_TASK_GRPC_PORT": str(port),
        "MHV_TASK_METRICS_PORT": str(metrics),
        "MHV_RELAY_ENABLED": "false",
    }
    log = Path(tmp_path_factory.mktemp("default-limits")) / "task.log"
    process = ServiceProcess("mhv_task", env, port, metrics, log)
    await process.start()
    yield process.target
    await asyncio.to_thread(process.stop)


async def _refused_after(limit: int, call: Call) -> aio.AioRpcError:
    """Make `limit` calls, which must all pass; then the next ones until one is refused."""
    for n in range(limit):
        try:
            await call()
        except aio.AioRpcError as error:
            refused = f"call {n + 1} of {limit} was refused: {error.details()}"
            raise AssertionError(refused) from error
    # The window slides: calls made while it moved on may pass, a whole window's more may not.
    for _ in range(limit):
        try:
            await call()
        except aio.AioRpcError as error:
            return error
    raise AssertionError(f"{2 * limit} calls passed a limit of {limit}")


@pytest.mark.parametrize(("rate_class", "limit"), [("create", 10), ("search", 30), ("general", 60)])
async def test_the_plans_limits_hold_by_default(
    defaults: str, people: People, rate_class: str, limit: int
) -> None:
    # A caller of its own per class, so no class's calls count against another's budget.
    md = {"create": people.alice, "search": people.bob, "general": people.viewer}[rate_class].md()
    async with aio.insecure_channel(defaults) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        calls: dict[str, Call] = {
            "create": lambda: tasks.CreateTask(
                task_pb2.CreateTaskRequest(
                    title=f"limit {uuid.uuid4().hex[:6]}", repository="demo"
                ),
                metadata=md,
            ),
            "search": lambda: tasks.SearchTasks(
                task_pb2.SearchTasksRequest(query="limit"), metadata=md
            ),
            "general": lambda: tasks.ListTasks(task_pb2.ListTasksRequest(page_size=1), metadata=md),
        }
        error = await _refused_after(limit, calls[rate_class])
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MHV-006")
    assert f"Rate limit {limit} per 1 minute for {rate_class} requests" in error.details()
