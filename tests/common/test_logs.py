"""JSON log lines: one object per line, the record's time, its extras, and no secret in clear."""

from __future__ import annotations

import json
import logging

from mhv_common.logs import JsonFormatter


def _record(created: float, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("mhv.access", logging.INFO, "", 0, "rpc", None, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_lines_carry_time_extras_and_mask_secret_keys() -> None:
    formatter = JsonFormatter("mahavishnu-test")
    lines = [
        formatter.format(_record(1_700_000_000.125, grpc_code="OK", api_token="s3cret", n=1)),
        # The next second, then the same second again: each line has its own time.
        formatter.format(_record(1_700_000_001.5, grpc_code="OK", n=2)),
        formatter.format(_record(1_700_000_001.75, grpc_code="OK", n="ü")),
    ]
    assert all("\n" not in line for line in lines)
    entries = [json.loads(line) for line in lines]
    assert [e["ts"] for e in entries] == [
        "2023-11-14T22:13:20.125Z",
        "2023-11-14T22:13:21.500Z",
        "2023-11-14T22:13:21.750Z",
    ]
    assert entries[0]["api_token"] == "[REDACTED]"
    assert "s3cret" not in lines[0]
    assert [e["n"] for e in entries] == [1, 2, "ü"]
    assert {e["msg"] for e in entries} == {"rpc"}
    assert {e["level"] for e in entries} == {"info"}
    assert {e["service"] for e in entries} == {"mahavishnu-test"}


def test_values_json_cannot_hold_are_written_as_text() -> None:
    formatter = JsonFormatter("mahavishnu-test")
    entry = json.loads(formatter.format(_record(1_700_000_000.0, big=2**70, obj=object())))
    assert entry["big"] == 2**70
    assert entry["obj"].startswith("<object object")
