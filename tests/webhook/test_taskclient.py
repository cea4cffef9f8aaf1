"""The task client's typed answers: statuses, and failures as transient or permanent with the
task service's own error. (The calls themselves run against the real task service in
test_saga.py.)"""

from __future__ import annotations

import grpc
from grpc import aio

from mahavishnu.task.v1 import task_pb2
from mhv_common.errors import (
    GRPC_DETAILS_METADATA_KEY,
    MahavishnuError,
    ServiceUnavailableError,
    TaskAlreadyCompletedError,
    UserInactiveError,
)
from mhv_webhook._taskclient import (
    _STATUS,
    PermanentError,
    TaskStatus,
    TransientError,
    _fail,
)


def _rpc_error(code: grpc.StatusCode, answer: MahavishnuError | None) -> aio.AioRpcError:
    trailing = aio.Metadata()
    if answer is not None:
        trailing.add(GRPC_DETAILS_METADATA_KEY, answer.to_rpc_status().SerializeToString())
    return aio.AioRpcError(code, aio.Metadata(), trailing, details="refused")


def test_a_refusal_is_permanent_and_carries_the_typed_error() -> None:
    failure = _fail(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, UserInactiveError()))
    assert isinstance(failure, PermanentError)
    assert isinstance(failure.error, UserInactiveError)
    assert str(failure) == "task service answered FAILED_PRECONDITION [MHV-112]"
    done = _fail(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, TaskAlreadyCompletedError()))
    assert isinstance(done.error, TaskAlreadyCompletedError)
    assert not isinstance(done.error, UserInactiveError)


def test_an_outage_is_transient() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        failure = _fail(_rpc_error(code, None))
        assert isinstance(failure, TransientError)
        assert failure.error is None
        assert str(failure) == f"task service answered {code.name}"
    busy = _fail(_rpc_error(grpc.StatusCode.UNAVAILABLE, ServiceUnavailableError()))
    assert isinstance(busy, TransientError)
    assert isinstance(busy.error, ServiceUnavailableError)
    interrupted = _fail(ConnectionResetError())
    assert isinstance(interrupted, TransientError)
    assert "interrupted (ConnectionResetError)" in str(interrupted)


def test_only_answers_that_pass_are_transient() -> None:
    passing = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN"}
    passing.add("CANCELLED")
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            transient = isinstance(_fail(_rpc_error(code, None)), TransientError)
            assert transient == (code.name in passing), code


def test_every_task_status_has_a_typed_value() -> None:
    known = {
        value for name, value in task_pb2.TaskStatus.items() if name != "TASK_STATUS_UNSPECIFIED"
    }
    assert set(_STATUS) == known
    assert {s for s in TaskStatus if s.closed} == {TaskStatus.COMPLETED, TaskStatus.CANCELLED}
    assert _STATUS[task_pb2.TASK_STATUS_IN_PROGRESS] is TaskStatus.IN_PROGRESS
