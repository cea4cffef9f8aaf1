"""The HTTPS edge over a real TLS socket against the real inbox: verification, freshness,
replay protection, limits, and the error body."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from mhv_webhook._headers import HeaderView
from mhv_webhook._scheme import FreshnessWindow
from mhv_webhook._scheme_standard import verify_signature as verify_standard
from tests.harness import Deployment
from tests.webhook.conftest import (
    EDGE_SOURCES,
    OFFICIAL_SECRET,
    EdgeServer,
    Secrets,
    Tls,
    edge_settings,
)
from tests.webhook.signing import (
    github_headers,
    gitlab_token_headers,
    standard_headers,
    standard_signature,
)

ERROR_KEYS = {"error_code", "message", "recovery", "documentation"}
OPTIONAL_ERROR_KEYS = {"field_violations", "retry_after_seconds"}

# The Standard Webhooks project's own vectors (libraries/python/tests/test_webhooks.py).
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
VECTOR_BAD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="


def body_for(name: str) -> bytes:
    return json.dumps(
        {"action": "opened", "issue": {"title": name}, "n": uuid.uuid4().hex}
    ).encode()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error_code"] == code
    assert ERROR_KEYS <= set(body) <= ERROR_KEYS | OPTIONAL_ERROR_KEYS
    assert body["documentation"].endswith(code.lower())
    assert "Traceback" not in response.text
    return body


def rows_for(edge: EdgeServer, source: str, delivery_id: str) -> int:
    return int(
        edge.fetchval(
            "SELECT count(*) FROM deliveries WHERE source = $1 AND delivery_id = $2",
            source,
            delivery_id,
        )
    )


# --- Standard Webhooks: the official vectors ----------------------------------------------


def test_test_signer_reproduces_the_official_vector() -> None:
    assert (
        standard_signature(OFFICIAL_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
        == VECTOR_SIGNATURE
    )


def test_verifier_accepts_the_official_vector_and_refuses_its_bad_twin() -> None:
    from mhv_webhook._secrets import parse_secrets

    keys = parse_secrets("official", OFFICIAL_SECRET)
    headers = HeaderView(
        [
            (b"webhook-id", VECTOR_ID.encode()),
            (b"webhook-timestamp", str(VECTOR_TIMESTAMP).encode()),
            (b"webhook-signature", VECTOR_SIGNATURE.encode()),
        ]
    )
    window = FreshnessWindow()
    assert verify_standard(headers, VECTOR_BODY, keys, now=VECTOR_TIMESTAMP, window=window) == (
        VECTOR_ID,
        "0",
    )
    bad = HeaderView(
        [
            (b"webhook-id", VECTOR_ID.encode()),
            (b"webhook-timestamp", str(VECTOR_TIMESTAMP).encode()),
            (b"webhook-signature", VECTOR_BAD_SIGNATURE.encode()),
        ]
    )
    from mhv_common.errors import WebhookSignatureInvalidError

    with pytest.raises(WebhookSignatureInvalidError):
        verify_standard(bad, VECTOR_BODY, keys, now=VECTOR_TIMESTAMP, window=window)


def _vector_headers(signature: str, timestamp: int = VECTOR_TIMESTAMP) -> dict[str, str]:
    return {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def test_official_vectors_over_https(client: httpx.Client, edge: EdgeServer) -> None:
    edge.clock.pinned = VECTOR_TIMESTAMP
    # Invalid signature vector.
    bad = client.post(
        "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_BAD_SIGNATURE)
    )
    assert_error(bad, 401, "MHV-300")
    # Several signatures, other versions among them, one valid: accepted.
    multi = " ".join(
        [
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            VECTOR_SIGNATURE,
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        ]
    )
    first = client.post("/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(multi))
    assert first.status_code == 202, first.text
    assert first.json()["delivery_id"] == VECTOR_ID
    # The single valid signature verifies too; the id was already received: 200, MHV-301.
    again = client.post(
        "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_SIGNATURE)
    )
    assert_error(again, 200, "MHV-301")
    assert rows_for(edge, "official", VECTOR_ID) == 1
    # Too old and too new by more than the window (the vectors' 5-minute tolerance).
    edge.clock.pinned = VECTOR_TIMESTAMP + 301
    assert_error(
        client.post(
            "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_SIGNATURE)
        ),
        401,
        "MHV-304",
    )
    edge.clock.pinned = VECTOR_TIMESTAMP - 31
    assert_error(
        client.post(
            "/webhooks/official", content=VECTOR_BODY, headers=_vector_headers(VECTOR_SIGNATURE)
        ),
        401,
        "MHV-304",
    )
    # Missing headers.
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        edge.clock.pinned = VECTOR_TIMESTAMP
        headers = _vector_headers(VECTOR_SIGNATURE)
        del headers[missing]
        response = client.post("/webhooks/official", content=VECTOR_BODY, headers=headers)
        assert response.status_code == 401, (missing, response.text)


# --- Freshness: each edge of the window, +-1 s, with a controlled clock ------------------

NOW = 1_800_000_000


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (-301, False),
        (-300, True),
        (-299, True),
        (29, True),
        (30, True),
        (31, False),
    ],
)
def test_window_edges(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets, offset: int, accepted: bool
) -> None:
    edge.clock.pinned = NOW
    msg_id = f"msg_edge_{uuid.uuid4().hex}"
    body = body_for("edge")
    headers = standard_headers(hook_secrets.generic, body, msg_id=msg_id, timestamp=NOW + offset)
    response = client.post("/webhooks/generic", content=body, headers=headers)
    if accepted:
        assert response.status_code == 202, response.text
        assert rows_for(edge, "generic", msg_id) == 1
    else:
        body_json = assert_error(response, 401, "MHV-304")
        assert ("older" in str(body_json["message"])) == (offset < 0)
        assert rows_for(edge, "generic", msg_id) == 0


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


# --- GitHub ---------------------------------------------------------------------------


def test_github_delivery_retry_and_captured_replay(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = body_for("github")
    delivery = str(uuid.uuid4())
    headers = github_headers(hook_secrets.github, body, delivery=delivery)
    first = client.post("/webhooks/github", content=body, headers=headers)
    assert first.status_code == 202, first.text
    # GitHub redelivers with the same id: acknowledged, not enqueued.
    assert_error(client.post("/webhooks/github", content=body, headers=headers), 200, "MHV-301")
    # A captured request resent under a fresh delivery id: the signature still verifies (it
    # covers only the body) but the body is recognised.
    replays_before = metric("webhook_duplicates_total", source="github", matched="body")
    forged = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=body, headers=forged), 200, "MHV-301")
    assert metric("webhook_duplicates_total", source="github", matched="body") == replays_before + 1
    assert rows_for(edge, "github", delivery) == 1
    assert (
        int(
            edge.fetchval(
                "SELECT count(*) FROM deliveries WHERE source = 'github' AND body = $1", body
            )
        )
        == 1
    )


def test_github_replay_days_later_within_retention_is_not_enqueued(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = body_for("captured")
    delivery = str(uuid.uuid4())
    headers = github_headers(hook_secrets.github, body, delivery=delivery)
    assert client.post("/webhooks/github", content=body, headers=headers).status_code == 202
    digest = hashlib.sha256(body).hexdigest()
    # Three days pass (of the four-day retention).
    edge.execute(
        "UPDATE dedup SET received_at = received_at - interval '3 days'"
        " WHERE source = 'github' AND key IN ($1, $2)",
        delivery,
        digest,
    )
    for replay in (headers, github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))):
        assert_error(client.post("/webhooks/github", content=body, headers=replay), 200, "MHV-301")
    assert rows_for(edge, "github", delivery) == 1


def test_github_rejections(client: httpx.Client, hook_secrets: Secrets) -> None:
    body = body_for("rejected")
    good = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    wrong = github_headers("not-the-secret-at-all-0123456789", body, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=body, headers=wrong), 401, "MHV-300")
    for broken in ("sha256=zz", "sha1=" + "0" * 40, "sha256=" + "0" * 63, ""):
        headers = {**good, "X-Hub-Signature-256": broken}
        assert_error(client.post("/webhooks/github", content=body, headers=headers), 401, "MHV-300")
    no_delivery = {k: v for k, v in good.items() if k != "X-GitHub-Delivery"}
    body_json = assert_error(
        client.post("/webhooks/github", content=body, headers=no_delivery), 400, "MHV-003"
    )
    assert body_json["field_violations"] == [
        {"field": "x-github-delivery", "description": "is required"}
    ]
    # Authentic but not JSON: parsed only after verification, refused as malformed.
    text = b"payload=%7B%7D"
    form = github_headers(hook_secrets.github, text, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=text, headers=form), 400, "MHV-003")
    array = b"[1, 2]"
    listed = github_headers(hook_secrets.github, array, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/github", content=array, headers=listed), 400, "MHV-003")


def test_repeated_and_non_utf8_headers_are_malformed(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    body = body_for("headers")
    headers = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    raw = [(k.encode(), v.encode()) for k, v in headers.items() if k != "X-GitHub-Delivery"]
    broken = [*raw, (b"X-GitHub-Delivery", b"\xff\xfe-not-utf8")]
    assert_error(client.post("/webhooks/github", content=body, headers=broken), 400, "MHV-003")
    doubled = [*raw, (b"X-GitHub-Delivery", b"a"), (b"X-GitHub-Delivery", b"b")]
    assert_error(client.post("/webhooks/github", content=body, headers=doubled), 400, "MHV-003")
    signature = next(v for k, v in raw if k == b"X-Hub-Signature-256")
    twice = [*raw, (b"X-GitHub-Delivery", b"c"), (b"X-Hub-Signature-256", signature)]
    assert_error(client.post("/webhooks/github", content=body, headers=twice), 400, "MHV-003")


# --- GitLab ---------------------------------------------------------------------------


def test_gitlab_secret_token(client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets) -> None:
    body = json.dumps({"object_kind": "issue", "object_attributes": {"action": "open"}}).encode()
    event_uuid, key = str(uuid.uuid4()), str(uuid.uuid4())
    headers = gitlab_token_headers(
        hook_secrets.gitlab_token, event_uuid=event_uuid, idempotency_key=key
    )
    response = client.post("/webhooks/gitlab", content=body, headers=headers)
    assert response.status_code == 202, response.text
    # Idempotency-Key is the dedup key when present.
    assert response.json()["delivery_id"] == key
    row = edge.run(
        edge._conn.fetchrow(  # type: ignore[union-attr]
            "SELECT event, action FROM deliveries WHERE source = 'gitlab' AND delivery_id = $1", key
        )
    )
    assert (row["event"], row["action"]) == ("Issue Hook", "open")
    # A GitLab retry carries the same Idempotency-Key.
    assert_error(client.post("/webhooks/gitlab", content=body, headers=headers), 200, "MHV-301")
    # Without Idempotency-Key (GitLab before 17.4) the event UUID is the key.
    older = json.dumps({"object_kind": "note", "n": uuid.uuid4().hex}).encode()
    legacy = gitlab_token_headers(hook_secrets.gitlab_token, event_uuid=str(uuid.uuid4()))
    response = client.post("/webhooks/gitlab", content=older, headers=legacy)
    assert response.status_code == 202
    assert response.json()["delivery_id"] == legacy["X-Gitlab-Event-UUID"]
    # Wrong or missing token.
    wrong = gitlab_token_headers("x" * 40, event_uuid=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/gitlab", content=body, headers=wrong), 401, "MHV-300")
    missing = {k: v for k, v in headers.items() if k != "X-Gitlab-Token"}
    assert_error(client.post("/webhooks/gitlab", content=body, headers=missing), 401, "MHV-300")
    neither = {
        k: v for k, v in legacy.items() if k not in ("X-Gitlab-Event-UUID", "Idempotency-Key")
    }
    assert_error(client.post("/webhooks/gitlab", content=older, headers=neither), 400, "MHV-003")


def test_gitlab_signing_token(
    client: httpx.Client, edge: EdgeServer, hook_secrets: Secrets
) -> None:
    body = json.dumps({"object_kind": "issue", "n": uuid.uuid4().hex}).encode()
    msg_id = str(uuid.uuid4())
    now = int(time.time())
    signed = {
        **gitlab_token_headers(
            hook_secrets.gitlab_token, event_uuid=str(uuid.uuid4()), idempotency_key=msg_id
        ),
        **standard_headers(hook_secrets.gitlab_signing, body, msg_id=msg_id, timestamp=now),
    }
    response = client.post("/webhooks/gitlab_signed", content=body, headers=signed)
    assert response.status_code == 202, response.text
    assert response.json()["delivery_id"] == msg_id
    # Both kinds are configured for this source: the token alone is not enough.
    token_only = {k: v for k, v in signed.items() if not k.startswith("webhook-")}
    assert_error(
        client.post("/webhooks/gitlab_signed", content=body, headers=token_only), 401, "MHV-300"
    )
    # Nor the signature alone.
    signature_only = {k: v for k, v in signed.items() if k != "X-Gitlab-Token"}
    assert_error(
        client.post("/webhooks/gitlab_signed", content=body, headers=signature_only), 401, "MHV-300"
    )
    # Signed timestamps are held to the window.
    old_id = str(uuid.uuid4())
    old = {
        **gitlab_token_headers(
            hook_secrets.gitlab_token, event_uuid=old_id, idempotency_key=old_id
        ),
        **standard_headers(hook_secrets.gitlab_signing, body, msg_id=old_id, timestamp=now - 3600),
    }
    assert_error(client.post("/webhooks/gitlab_signed", content=body, headers=old), 401, "MHV-304")
    # The signed webhook-id and Idempotency-Key must agree.
    other = str(uuid.uuid4())
    mismatched = {
        **gitlab_token_headers(hook_secrets.gitlab_token, event_uuid=other, idempotency_key=other),
        **standard_headers(
            hook_secrets.gitlab_signing, body, msg_id=str(uuid.uuid4()), timestamp=now
        ),
    }
    assert_error(
        client.post("/webhooks/gitlab_signed", content=body, headers=mismatched), 400, "MHV-003"
    )
    assert rows_for(edge, "gitlab_signed", msg_id) == 1


# --- Secret rotation --------------------------------------------------------------------


def test_rotation_accepts_old_and_new_refuses_expired_and_reports_the_key(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    before = {
        key: metric("webhook_secret_matches_total", source="rotating", key=key)
        for key in ("new", "1", "retired")
    }
    for secret, key in ((hook_secrets.rotating_new, "new"), (hook_secrets.rotating_old, "1")):
        body = body_for(f"rotation-{key}")
        headers = github_headers(secret, body, delivery=str(uuid.uuid4()))
        assert client.post("/webhooks/rotating", content=body, headers=headers).status_code == 202
        assert metric("webhook_secret_matches_total", source="rotating", key=key) == before[key] + 1
    body = body_for("rotation-expired")
    expired = github_headers(hook_secrets.rotating_expired, body, delivery=str(uuid.uuid4()))
    assert_error(client.post("/webhooks/rotating", content=body, headers=expired), 401, "MHV-300")
    assert (
        metric("webhook_secret_matches_total", source="rotating", key="retired")
        == before["retired"]
    )


# --- Limits -----------------------------------------------------------------------------

CAP = 1024 * 1024


async def _post_while_reading(
    edge: EdgeServer,
    tls: Tls,
    *,
    total: int,
    declare_length: bool,
    signature: str = "webhook-signature: v1,AAAA\r\n",
) -> tuple[int, dict[str, object], int]:
    """POST `total` bytes to the 1 MiB source while reading the answer, as curl does.

    Returns the status, the JSON body and how many body bytes this client managed to send
    before the gateway answered and closed.
    """
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", edge.port, ssl=tls.client_context(), server_hostname="localhost"
    )
    framing = f"Content-Length: {total}" if declare_length else "Transfer-Encoding: chunked"
    writer.write(
        (
            "POST /webhooks/generic HTTP/1.1\r\nHost: localhost\r\n"
            f"webhook-id: msg_big\r\nwebhook-timestamp: {int(time.time())}\r\n"
            f"{signature}{framing}\r\n\r\n"
        ).encode()
    )
    chunk = b" " * 65536
    sent = 0

    async def send_body() -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while sent < total:
                piece = chunk if declare_length else b"10000\r\n" + chunk + b"\r\n"
                writer.write(piece)
                await writer.drain()
                sent += len(chunk)

    sender = asyncio.create_task(send_body())
    try:
        answer = await asyncio.wait_for(reader.read(65536), 30)
        while b"\r\n\r\n" not in answer:
            answer += await asyncio.wait_for(reader.read(65536), 30)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(body) < length:
            body += await asyncio.wait_for(reader.read(65536), 30)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    status = int(head.split(b" ")[1])
    return status, json.loads(body), sent


async def test_declared_oversized_body_is_refused_without_reading_it(
    edge: EdgeServer, tls: Tls
) -> None:
    read_before = metric("webhook_body_bytes_received_total", source="generic")
    status, body, sent = await _post_while_reading(edge, tls, total=30 * CAP, declare_length=True)
    assert (status, body["error_code"]) == (413, "MHV-305")
    # Refused on Content-Length alone: not one body byte was read.
    assert metric("webhook_body_bytes_received_total", source="generic") == read_before
    assert sent < 30 * CAP


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
async def test_unsigned_requests_are_refused_before_their_body_is_read(
    edge: EdgeServer, tls: Tls, declare_length: bool
) -> None:
    # No signature at all, with a body within the cap: refused on its headers; the body is
    # neither read nor buffered, whatever its framing.
    read_before = metric("webhook_body_bytes_received_total", source="generic")
    status, body, _sent = await _post_while_reading(
        edge, tls, total=CAP // 2, declare_length=declare_length, signature=""
    )
    assert (status, body["error_code"]) == (401, "MHV-300")
    assert metric("webhook_body_bytes_received_total", source="generic") == read_before


async def test_streamed_oversized_body_is_cut_at_the_cap(edge: EdgeServer, tls: Tls) -> None:
    read_before = metric("webhook_body_bytes_received_total", source="generic")
    # Chunked transfer: no Content-Length, only the stream tells the size.
    status, body, sent = await _post_while_reading(edge, tls, total=30 * CAP, declare_length=False)
    assert (status, body["error_code"]) == (413, "MHV-305")
    read = metric("webhook_body_bytes_received_total", source="generic") - read_before
    # The server read the cap and at most one more transport read, never the 30 MiB.
    assert CAP < read <= CAP + 256 * 1024
    assert sent < 30 * CAP


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
        b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\n",
    ],
    ids=["oversized-headers", "garbage", "bad-header-name", "conflicting-lengths"],
)
async def test_unparseable_http_gets_the_json_400(
    edge: EdgeServer, tls: Tls, request_bytes: bytes
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", edge.port, ssl=tls.client_context(), server_hostname="localhost"
    )
    writer.write(request_bytes)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    payload = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    status = int(head.split(b" ")[1])
    # The parser refuses what is not HTTP; a large but well-formed header block reaches the
    # edge, which refuses the unsigned request. Either way: a 4xx with the JSON body.
    assert 400 <= status < 500, head
    assert payload["error_code"] in ("MHV-003", "MHV-300")
    assert set(payload) == {"error_code", "message", "recovery", "documentation"}
    if status == 400:
        assert payload["error_code"] == "MHV-003"


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


# --- Routing ----------------------------------------------------------------------------


def test_unknown_source_wrong_method_and_health(client: httpx.Client) -> None:
    assert_error(client.post("/webhooks/nope", content=b"{}"), 404, "MHV-306")
    assert_error(client.post("/elsewhere", content=b"{}"), 404, "MHV-306")
    assert_error(client.get("/webhooks/github"), 405, "MHV-003")
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert metric("webhook_requests_total", source="unknown", code="404") >= 1


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


def test_requests_per_client_address_are_limited_before_verification(
    deployment: Deployment, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> None:
    sources = tmp_path / "webhooks.yaml"
    sources.write_text(EDGE_SOURCES)
    settings = edge_settings(deployment, tls, sources).model_copy(
        update={"rate_limits": {"webhook_unverified": "3/minute"}}
    )
    server = EdgeServer(settings, hook_secrets.edge_environ(), deployment.role_url("webhook"))
    server.start()
    try:
        with httpx.Client(base_url=server.url, verify=tls.client_context()) as client:
            statuses = [
                client.post("/webhooks/generic", content=b"{}").status_code for _ in range(4)
            ]
        assert statuses == [401, 401, 401, 429]
    finally:
        server.close()


@pytest.fixture
def guarded_edge(
    deployment: Deployment, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> Iterator[EdgeServer]:
    """A gateway with tight connection guards: 3 per address, 0.5 s for a request head."""
    sources = tmp_path / "webhooks.yaml"
    sources.write_text(EDGE_SOURCES)
    settings = edge_settings(deployment, tls, sources).model_copy(
        update={"webhook_head_timeout_seconds": 0.5, "webhook_max_connections_per_address": 3}
    )
    server = EdgeServer(settings, hook_secrets.edge_environ(), deployment.role_url("webhook"))
    server.start()
    yield server
    server.close()


async def _open(edge: EdgeServer, tls: Tls) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", edge.port, ssl=tls.client_context(), server_hostname="localhost"
    )


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def test_silent_and_trickling_connections_are_closed(
    guarded_edge: EdgeServer, tls: Tls
) -> None:
    before = metric("webhook_connections_closed_total", reason="head_timeout")
    silent_reader, silent = await _open(guarded_edge, tls)
    trickle_reader, trickle = await _open(guarded_edge, tls)
    trickle.write(b"POST /webhooks/generic HTTP/1.1\r\nHost: local")  # and never the rest
    await trickle.drain()
    assert await _closed_by_server(silent_reader)
    assert await _closed_by_server(trickle_reader)
    for writer in (silent, trickle):
        writer.close()
    assert metric("webhook_connections_closed_total", reason="head_timeout") - before == 2


async def test_one_address_cannot_hold_every_connection(guarded_edge: EdgeServer, tls: Tls) -> None:
    held = [await _open(guarded_edge, tls) for _ in range(3)]
    reader, writer = await _open(guarded_edge, tls)
    # The fourth from the same address is closed at once (before the head timeout matters).
    assert await _closed_by_server(reader)
    writer.close()
    assert metric("webhook_connections_closed_total", reason="per_address") >= 1
    for _reader, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.2)
    # Once they are gone the address is served again.
    async with httpx.AsyncClient(base_url=guarded_edge.url, verify=tls.client_context()) as c:
        assert (await c.get("/healthz")).status_code == 200
