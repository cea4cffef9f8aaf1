"""Receiving: each source's budget is spent only by new deliveries its own secret signed."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.webhook.conftest import EdgeServer, Secrets
from tests.webhook.signing import standard_headers
from tests.webhook.support import assert_error, body_for


def test_rate_limit_per_source_429_with_retry_after(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    statuses = []
    for _ in range(6):
        body = body_for("limited")
        headers = standard_headers(
            hook_secrets.generic, body, msg_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time())
        )
        last = client.post("/webhooks/limited", content=body, headers=headers)
        statuses.append(last.status_code)
    assert statuses == [202] * 5 + [429]
    body_json = assert_error(last, 429, "MHV-006")
    assert 1 <= int(last.headers["Retry-After"]) <= 60
    assert float(body_json["retry_after_seconds"]) > 0  # type: ignore[arg-type]
    # Other sources have budgets of their own.
    body = body_for("other")
    headers = standard_headers(
        hook_secrets.generic, body, msg_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time())
    )
    assert client.post("/webhooks/generic", content=body, headers=headers).status_code == 202


def test_unsigned_requests_do_not_spend_a_sources_budget(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    # A flood of unsigned junk is refused without touching the source's budget...
    for _ in range(10):
        junk = client.post(
            "/webhooks/guarded",
            content=b"{}",
            headers={
                "webhook-id": f"msg_{uuid.uuid4().hex}",
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": "v1,AAAA",
            },
        )
        assert junk.status_code == 401
    # ...so the real sender still gets its three deliveries through, then the limit.
    statuses = []
    for _ in range(4):
        body = body_for("guarded")
        headers = standard_headers(
            hook_secrets.generic, body, msg_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time())
        )
        statuses.append(client.post("/webhooks/guarded", content=body, headers=headers).status_code)
    assert statuses == [202, 202, 202, 429]


def test_repeats_are_acknowledged_without_spending_the_budget(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    # A captured delivery replayed over and over (or a sender retrying) gets its 2xx each time
    # and costs nothing, so the sender's new deliveries still get their 3/minute.
    body = body_for("replayed")
    captured = standard_headers(
        hook_secrets.generic, body, msg_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time())
    )
    assert client.post("/webhooks/replayed", content=body, headers=captured).status_code == 202
    for _ in range(10):
        again = client.post("/webhooks/replayed", content=body, headers=captured)
        assert again.status_code == 200
        assert again.json()["error_code"] == "MHV-301"
    statuses = []
    for _ in range(3):
        fresh = body_for("replayed")
        headers = standard_headers(
            hook_secrets.generic,
            fresh,
            msg_id=f"msg_{uuid.uuid4().hex}",
            timestamp=int(time.time()),
        )
        statuses.append(
            client.post("/webhooks/replayed", content=fresh, headers=headers).status_code
        )
    assert statuses == [202, 202, 429]
    # Over budget, a repeat is still acknowledged, not refused.
    assert client.post("/webhooks/replayed", content=body, headers=captured).status_code == 200
