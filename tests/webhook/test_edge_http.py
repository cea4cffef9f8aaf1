"""The HTTPS edge's routes and endpoint over a real TLS socket against the real inbox."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.webhook.conftest import EdgeServer, Secrets
from tests.webhook.signing import standard_headers
from tests.webhook.support import assert_error, body_for, metric


def test_accepted_delivery_is_committed_before_the_202(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = body_for("stored")
    msg_id = f"msg_{uuid.uuid4().hex}"
    headers = standard_headers(
        hook_secrets.generic, body, msg_id=msg_id, timestamp=int(time.time())
    )
    headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    response = client.post("/webhooks/generic", content=body, headers=headers)
    assert response.status_code == 202
    row_id = uuid.UUID(response.json()["id"])
    stored = edge.run(
        edge._conn.fetchrow(  # type: ignore[union-attr]
            "SELECT source, delivery_id, event, body, headers::text AS headers, state, attempts"
            " FROM deliveries WHERE id = $1",
            row_id,
        )
    )
    assert stored is not None
    assert stored["body"] == body
    assert (stored["source"], stored["delivery_id"], stored["state"], stored["attempts"]) == (
        "generic",
        msg_id,
        "pending",
        0,
    )
    # Signatures and tokens are never stored.
    assert "signature" not in stored["headers"] and "v1," not in stored["headers"]


def test_unknown_source_wrong_method_and_health(client: httpx.Client) -> None:
    assert_error(client.post("/webhooks/nope", content=b"{}"), 404, "MHV-306")
    assert_error(client.post("/elsewhere", content=b"{}"), 404, "MHV-306")
    assert_error(client.get("/webhooks/github"), 405, "MHV-003")
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert metric("webhook_requests_total", source="unknown", code="404") >= 1
