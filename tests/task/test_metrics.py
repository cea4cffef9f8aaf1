"""The task service's /metrics: the plan's names, labels and buckets."""

from __future__ import annotations

import asyncio

from mahavishnu.task.v1 import task_pb2_grpc
from mhv_common.errors import (
    DatabaseConnectionError,
    DeadlineExceededError,
    TaskNotFoundError,
    ValidationError,
)
from mhv_task._metrics import outcome
from tests.conftest import Services
from tests.harness import rpc_error, sample, scrape
from tests.task.conftest import People, new_task


def _get(samples: dict, name: str, **labels: str) -> float:
    return sample(samples, name, labels)


async def test_task_creation_metrics(
    services: Services, tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    before = await scrape(services.task.metrics_port)
    for _ in range(3):
        await new_task(tasks, people.alice, repository="mahavishnu")
    await rpc_error(new_task(tasks, people.alice, repository="mahavishnu", title=""))
    await rpc_error(new_task(tasks, people.alice, repository="nowhere-at-all"))
    after = await scrape(services.task.metrics_port)
    delta = lambda name, **kw: _get(after, name, **kw) - _get(before, name, **kw)  # noqa: E731
    assert delta("task_creation_total", repository="mahavishnu", status="success") == 3
    assert delta("task_creation_total", repository="mahavishnu", status="rejected") == 1
    # Unconfigured names share one label value: callers cannot blow up the label set.
    assert delta("task_creation_total", repository="_unknown", status="rejected") == 1
    assert delta("task_creation_duration_seconds_count", repository="mahavishnu") == 4
    buckets = sorted(
        float(dict(labels)["le"])
        for (name, labels) in after
        if name == "task_creation_duration_seconds_bucket"
        and dict(labels)["repository"] == "mahavishnu"
    )
    assert buckets == [0.05, 0.1, 0.5, 1.0, 5.0, float("inf")]


async def test_rpc_and_pool_metrics(
    services: Services, tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    await new_task(tasks, people.alice)
    await asyncio.sleep(0)
    samples = await scrape(services.task.metrics_port)
    assert (
        _get(
            samples,
            "grpc_server_handled_total",
            grpc_service="mahavishnu.task.v1.TaskService",
            grpc_method="CreateTask",
            grpc_code="OK",
        )
        >= 1
    )
    assert _get(samples, "database_pool_size", database="postgresql", pool="task") > 0
    assert (
        "database_connections",
        frozenset({("database", "postgresql"), ("pool", "task")}),
    ) in samples


def test_outcomes_blame_the_caller_or_the_service() -> None:
    assert outcome(None) == "success"
    assert outcome(ValidationError()) == "rejected"
    assert outcome(TaskNotFoundError()) == "rejected"
    # Our faults, including a deadline we could not meet and anything unexpected.
    assert outcome(DeadlineExceededError()) == "error"
    assert outcome(DatabaseConnectionError()) == "error"
    assert outcome(RuntimeError("boom")) == "error"
