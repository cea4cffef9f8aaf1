"""Protobuf <-> domain types at the task service's edge."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from mahavishnu.task.v1 import task_pb2
from mhv_common.errors import MahavishnuError
from mhv_common.structs import NOT_FINITE, plain_struct
from mhv_task import _edge_codec as codec
from mhv_task._lifecycle import Status
from mhv_task._models import Page, QualityCheck, QualityGate, Task
from tests.task.conftest import REPOSITORIES


def test_non_finite_numbers_reach_the_model_and_are_refused() -> None:
    request = task_pb2.CreateTaskRequest(title="t", repository="demo")
    request.metadata.update({"ratio": math.nan})
    with pytest.raises(MahavishnuError) as refused:
        codec.create_task(request, REPOSITORIES)
    assert refused.value.code == "MHV-003"
    assert [v.field for v in refused.value.violations] == ["metadata"]
    # Refused with the request's other violations, by the model, not alone by the decoder.
    request.title = ""
    with pytest.raises(MahavishnuError) as refused:
        codec.create_task(request, REPOSITORIES)
    assert {v.field: v.description for v in refused.value.violations} == {
        "title": "must not be empty",
        "metadata": NOT_FINITE,
    }
    # An UpdateTask ignores what its mask does not name, a Struct it could not decode too.
    update = task_pb2.UpdateTaskRequest(task=task_pb2.Task(id=3, title="t"))
    update.task.metadata.update({"ratio": math.inf})
    update.update_mask.paths.append("title")
    assert codec.update_task(update).changes() == {"title": "t"}
    update.update_mask.paths.append("metadata")
    with pytest.raises(MahavishnuError) as refused:
        codec.update_task(update)
    assert [v.field for v in refused.value.violations] == ["task.metadata"]


def test_enum_numbers_without_a_name_are_refused_by_the_models() -> None:
    with pytest.raises(MahavishnuError) as refused:
        codec.list_tasks(task_pb2.ListTasksRequest(status=42, priority=42))  # type: ignore[arg-type]
    assert {v.field: v.description for v in refused.value.violations} == {
        "status": "unknown status",
        "priority": "unknown priority",
    }
    listing = codec.list_tasks(task_pb2.ListTasksRequest(status=task_pb2.TASK_STATUS_BLOCKED))
    assert (listing.status, listing.priority) == ("blocked", None)


def test_a_completion_without_a_gate_records_a_failed_empty_one() -> None:
    made = codec.complete_task(task_pb2.CompleteTaskRequest(id=3))
    assert made.quality_gate == QualityGate(passed=False, checks_run=0, checks=[])


def test_a_gate_that_did_not_run_crosses_the_wire_both_ways() -> None:
    made = codec.complete_task(
        task_pb2.CompleteTaskRequest(id=3, quality_gate=task_pb2.QualityGateResult(not_run=True))
    )
    assert made.quality_gate == QualityGate(not_run=True)
    message = codec.task_message(_task(quality_gate=made.quality_gate))
    assert message.quality_gate == task_pb2.QualityGateResult(not_run=True)
    assert message.HasField("quality_gate")


def test_an_update_names_a_new_repository() -> None:
    request = task_pb2.UpdateTaskRequest(
        task=task_pb2.Task(id=3, repository="mahavishnu"),
        update_mask=field_mask_pb2.FieldMask(paths=["repository"]),
    )
    assert codec.update_task(request).changes() == {"repository": "mahavishnu"}


NOW = dt.datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
AUTHOR, ASSIGNEE = uuid.uuid4(), uuid.uuid4()


def _task(**fields: Any) -> Task:
    gate = QualityGate(passed=True, checks_run=2, checks=[QualityCheck(name="ci", passed=True)])
    task = Task(
        id=9,
        title="t",
        description=None,
        repository="demo",
        priority="critical",
        status=Status.COMPLETED,
        status_before_block=None,
        deadline=NOW,
        created_by=AUTHOR,
        assigned_to=ASSIGNEE,
        metadata={"labels": ["x"]},
        blocked_reason=None,
        cancel_reason="dup",
        quality_gate=gate,
        created_at=NOW,
        updated_at=NOW,
        started_at=NOW,
        completed_at=NOW,
        version=4,
    )
    return task._replace(**fields)


def test_a_task_encodes_every_field() -> None:
    task = _task()
    message = codec.task_message(task)
    assert (message.id, message.description, message.etag) == (9, "", task.etag)
    assert message.priority == task_pb2.PRIORITY_CRITICAL
    assert message.status == task_pb2.TASK_STATUS_COMPLETED
    assert (message.created_by, message.assigned_to) == (str(AUTHOR), str(ASSIGNEE))
    assert message.deadline.ToDatetime(dt.UTC) == NOW
    assert plain_struct(message.metadata) == {"labels": ["x"]}
    assert message.cancel_reason == "dup"
    assert message.quality_gate == task_pb2.QualityGateResult(
        passed=True, checks_run=2, checks=[task_pb2.QualityCheck(name="ci", passed=True)]
    )
    bare = codec.task_message(task._replace(quality_gate=None, metadata={}, deadline=None))
    assert not bare.HasField("quality_gate")
    assert not bare.HasField("deadline")
    # Metadata is always present, as the API always sent it.
    assert bare.HasField("metadata")


def test_a_page_encodes_each_task_as_a_task_alone_does() -> None:
    tasks = [
        _task(),
        _task(id=10, quality_gate=None, metadata={}, deadline=None, started_at=None),
        _task(id=11, completed_at=None, assigned_to=None, description="d"),
    ]
    response = codec.list_response(Page(items=tasks, next_page_token="next"))
    assert list(response.tasks) == [codec.task_message(t) for t in tasks]
    assert response.next_page_token == "next"
    assert response.tasks[1].HasField("metadata")
    assert not response.tasks[1].HasField("start_time")
    assert response.tasks[0].HasField("complete_time")
    assert not response.tasks[2].HasField("complete_time")


@pytest.mark.parametrize(
    "moment",
    [
        dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
        dt.datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC),
        dt.datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=dt.UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        dt.datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    ],
)
def test_times_encode_as_from_datetime_does(moment: dt.datetime) -> None:
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(moment)
    message = codec.task_message(_task(deadline=moment))
    assert message.deadline == expected
