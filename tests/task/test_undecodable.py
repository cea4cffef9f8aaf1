"""Requests whose bytes do not decode, sent raw to the running task service.

grpc decodes a request before any of the service's code runs; what fails there must still be
answered like any bad request (INVALID_ARGUMENT, MHV-003, the usual details), counted in the
RPC metrics and logged once, without a traceback (`mhv_common.interceptors`, Decode).
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2

from mahavishnu.task.v1 import task_pb2
from tests.conftest import Services
from tests.harness import ROOT, detail, grpc_channel, metric, mhv_code, rich_status, rpc_error
from tests.task.conftest import People

CREATE = "/mahavishnu.task.v1.TaskService/CreateTask"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _nested_struct(depth: int) -> bytes:
    """A Struct holding {"a": {"a": ... }} `depth` levels deep, encoded by hand.

    protobuf's own encoder refuses to write what its parser would refuse to read.
    """
    struct = b""
    for _ in range(depth):
        value = _field(5, struct)  # Value.struct_value
        entry = _field(1, b"a") + _field(2, value)  # map entry: key, value
        struct = _field(1, entry)  # Struct.fields
    return struct


BODIES = {
    # A title field announcing far more bytes than follow.
    "corrupt-bytes": b"\x0a\xff\xff\xff\x0fshort",
    # title = b"\xc3\x28": not UTF-8, which proto3 strings must be.
    "invalid-utf8": _field(1, b"\xc3\x28") + _field(3, b"demo"),
    "over-deep-struct": _field(1, b"deep") + _field(3, b"demo") + _field(6, _nested_struct(150)),
}


def _log_lines(services: Services, request_id: str) -> list[str]:
    return [line for line in services.task.log_path.read_text().splitlines() if request_id in line]


@pytest.mark.parametrize("body", list(BODIES), ids=list(BODIES))
async def test_an_undecodable_request_is_a_counted_validation_error(
    services: Services, people: People, body: str
) -> None:
    labels = {
        "grpc_service": "mahavishnu.task.v1.TaskService",
        "grpc_method": "CreateTask",
        "grpc_code": "INVALID_ARGUMENT",
    }
    before = await metric(services.task.metrics_port, "grpc_server_handled_total", labels)
    request_id = f"undecodable-{uuid.uuid4().hex}"
    async with grpc_channel(services.task.target, services.ca_file) as channel:
        error = await rpc_error(
            channel.unary_unary(CREATE)(
                BODIES[body], metadata=people.alice.md(("x-request-id", request_id))
            )
        )
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")
    status = rich_status(error)
    bad = detail(status, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["request"]
    assert "mahavishnu.task.v1.CreateTaskRequest" in bad.field_violations[0].description
    # The help link opens a page of this repository (MHV_DOCS_BASE_URL unset).
    link = detail(status, error_details_pb2.Help).links[0].url
    assert link == "docs/errors/mhv-003.md" and (ROOT / link).is_file()
    for leaked in ("DecodeError", "Error parsing", "Traceback", "Unexpected"):
        assert leaked not in error.details()
    after = await metric(services.task.metrics_port, "grpc_server_handled_total", labels)
    assert after - before == 1
    lines = _log_lines(services, request_id)
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["error_code"] == "MHV-003"
    assert "Traceback" not in lines[0]


async def test_an_undecodable_request_without_a_token_is_refused_as_undecodable(
    services: Services,
) -> None:
    # No token: still MHV-003 (nothing to authenticate the bytes against), and counted against
    # the peer's rate-limit budget; tests/common/test_edge.py shows that budget running out.
    async with grpc_channel(services.task.target, services.ca_file) as channel:
        error = await rpc_error(channel.unary_unary(CREATE)(BODIES["corrupt-bytes"]))
    assert (error.code(), mhv_code(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "MHV-003")


async def test_a_decodable_request_still_reaches_the_handler(
    services: Services, people: People
) -> None:
    body = task_pb2.CreateTaskRequest(title="raw bytes", repository="demo").SerializeToString()
    async with grpc_channel(services.task.target, services.ca_file) as channel:
        reply = await channel.unary_unary(CREATE)(body, metadata=people.alice.md())
    assert task_pb2.Task.FromString(reply).title == "raw bytes"
