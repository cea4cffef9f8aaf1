"""Structured logs: one JSON object per line with request context; never a secret."""

from __future__ import annotations

import json
import uuid

from google.protobuf import struct_pb2

from mahavishnu.task.v1 import task_pb2, task_pb2_grpc
from tests.conftest import Services
from tests.harness import rpc_error
from tests.task.conftest import People
from tests.waiting import wait_until


def _lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_access_log_fields_and_no_secrets(
    services: Services, tasks: task_pb2_grpc.TaskServiceStub, people: People
) -> None:
    secret_text = f"TOPSECRET-{uuid.uuid4().hex}"
    api_key = f"sk-live-{uuid.uuid4().hex}"
    meta = struct_pb2.Struct()
    meta.update({"api_key": api_key, "note": "fine"})
    request_id = uuid.uuid4().hex
    logged_before = len(services.task.logs())
    task = await tasks.CreateTask(
        task_pb2.CreateTaskRequest(
            title="Logged", repository="demo", description=secret_text, metadata=meta
        ),
        metadata=(*people.alice.md(), ("x-request-id", request_id)),
    )
    error = await rpc_error(
        tasks.GetTask(task_pb2.GetTaskRequest(id=10**15), metadata=people.alice.md())
    )
    assert error is not None

    def logged() -> bool:
        # Complete lines only: the process may be writing the last one right now.
        entries = _lines(services.task.logs()[logged_before:].rpartition("\n")[0])
        rpcs = [e for e in entries if e.get("msg") == "rpc"]
        return any(e.get("request_id") == request_id for e in rpcs) and any(
            e.get("error_code") == "MHV-100" for e in rpcs
        )

    # The process writes a call's line after answering it: wait for both calls' lines.
    await wait_until(logged, what="both calls are logged")
    text = services.task.logs()
    for secret in (secret_text, api_key, people.alice.token, people.alice.token.split(".")[2]):
        assert secret not in text
    entries = _lines(text.rpartition("\n")[0])
    mine = [e for e in entries if e.get("request_id") == request_id and e.get("msg") == "rpc"]
    assert len(mine) == 1
    line = mine[0]
    assert line["method"] == "/mahavishnu.task.v1.TaskService/CreateTask"
    assert line["principal"] == people.alice.id
    assert line["grpc_code"] == "OK"
    assert line["latency_ms"] > 0
    assert len(line["trace_id"]) == 32
    assert line["service"] == "mahavishnu-task"
    failed = [e for e in entries if e.get("msg") == "rpc" and e.get("error_code") == "MHV-100"]
    assert failed and failed[-1]["grpc_code"] == "NOT_FOUND"
    assert task.id > 0
