"""Helpers the gateway's tests share: the error body's shape, metrics, stored rows."""

from __future__ import annotations

import json
import uuid

import httpx
from prometheus_client import REGISTRY

from tests.webhook.conftest import EdgeServer

ERROR_KEYS = {"error_code", "message", "recovery", "documentation"}
OPTIONAL_ERROR_KEYS = {"field_violations", "retry_after_seconds"}


def body_for(name: str) -> bytes:
    """A distinct JSON body for each call (a repeat only where a test repeats it)."""
    return json.dumps(
        {"action": "opened", "issue": {"title": name}, "n": uuid.uuid4().hex}
    ).encode()


def metric(name: str, **labels: str) -> float:
    """A sample of the in-process edge's metrics (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    """The answer is the catalog's JSON error body for `code`, with `status`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == code
    assert ERROR_KEYS <= set(body) <= ERROR_KEYS | OPTIONAL_ERROR_KEYS
    assert body["documentation"].endswith(f"{code.lower()}.md")
    assert "Traceback" not in response.text
    return body


def rows_for(edge: EdgeServer, source: str, delivery_id: str) -> int:
    """How many inbox rows hold this sender delivery id."""
    return int(
        edge.fetchval(
            "SELECT count(*) FROM deliveries WHERE source = $1 AND delivery_id = $2",
            source,
            delivery_id,
        )
    )
