"""Property and fuzz tests over real HTTPS: any flipped byte is refused, nothing yields a 5xx."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.webhook.conftest import EdgeServer, Secrets, Tls
from tests.webhook.signing import github_headers, standard_signature

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Bytes an HTTP/1.1 client may put in a header value (visible ASCII, space, obs-text).
HEADER_BYTES = st.integers(0x20, 0x7E) | st.integers(0x80, 0xFF)
# The same without space, which HTTP strips from either end of a value.
VISIBLE_BYTES = st.integers(0x21, 0x7E) | st.integers(0x80, 0xFF)


@pytest.fixture(scope="module")
def https(edge: EdgeServer, tls: Tls) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=edge.url, verify=tls.client_context(), timeout=30) as c:
        yield c


def _flip(value: bytes, index: int, replacement: int) -> bytes:
    index %= len(value)
    if value[index] == replacement:
        replacement ^= 0x01 if replacement != 0x7F else 0x02
    return value[:index] + bytes([replacement]) + value[index + 1 :]


def _deliveries(edge: EdgeServer, source: str) -> int:
    return int(edge.fetchval("SELECT count(*) FROM deliveries WHERE source = $1", source))


@PROPERTY_SETTINGS
@given(
    part=st.sampled_from(["id", "timestamp", "body"]),
    index=st.integers(0, 10_000),
    replacement=VISIBLE_BYTES,
)
def test_flipping_any_byte_of_id_timestamp_or_body_is_rejected(
    https: httpx.Client,
    edge: EdgeServer,
    hook_secrets: Secrets,
    part: str,
    index: int,
    replacement: int,
) -> None:
    edge.clock.pinned = None
    msg_id = f"msg_{uuid.uuid4().hex}".encode()
    timestamp = str(int(time.time())).encode()
    body = json.dumps({"type": "issue.opened", "n": uuid.uuid4().hex}).encode()
    signature = standard_signature(hook_secrets.generic, msg_id.decode(), timestamp.decode(), body)
    if part == "id":
        msg_id = _flip(msg_id, index, replacement)
    elif part == "timestamp":
        timestamp = _flip(timestamp, index, replacement)
    else:
        body = _flip(body, index, replacement)
    before = _deliveries(edge, "generic")
    response = https.post(
        "/webhooks/generic",
        content=body,
        headers=[
            (b"webhook-id", msg_id),
            (b"webhook-timestamp", timestamp),
            (b"webhook-signature", signature.encode()),
        ],
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error_code"] in ("MHV-300", "MHV-304", "MHV-003")
    assert _deliveries(edge, "generic") == before


@PROPERTY_SETTINGS
@given(index=st.integers(0, 10_000), replacement=st.integers(0, 255))
def test_flipping_any_byte_of_a_github_body_is_rejected(
    https: httpx.Client, edge: EdgeServer, hook_secrets: Secrets, index: int, replacement: int
) -> None:
    body = json.dumps({"action": "opened", "n": uuid.uuid4().hex}).encode()
    headers = github_headers(hook_secrets.github, body, delivery=str(uuid.uuid4()))
    response = https.post(
        "/webhooks/github", content=_flip(body, index, replacement), headers=headers
    )
    assert response.status_code == 401, response.text
    assert response.json()["error_code"] == "MHV-300"


HEADER_NAMES = st.sampled_from(
    [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-hub-signature-256",
        "x-github-delivery",
        "x-github-event",
        "x-gitlab-token",
        "x-gitlab-event",
        "x-gitlab-event-uuid",
        "idempotency-key",
        "traceparent",
        "tracestate",
        "content-type",
        "x-anything",
    ]
)
HEADER_VALUE = st.lists(HEADER_BYTES, max_size=300).map(bytes).map(lambda b: b.strip(b" "))
HEADERS = st.lists(st.tuples(HEADER_NAMES, HEADER_VALUE), max_size=12)
BODIES = st.one_of(
    st.binary(max_size=4096),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=30,
    ).map(lambda v: json.dumps(v).encode()),
    st.just(b"[" * 100_000 + b"]" * 100_000),
)
SOURCES = st.sampled_from(
    ["github", "gitlab", "gitlab_signed", "generic", "unknown-one", "x" * 300]
)


@PROPERTY_SETTINGS
@given(source=SOURCES, headers=HEADERS, body=BODIES)
def test_fuzzed_headers_and_bodies_never_get_a_5xx(
    https: httpx.Client, source: str, headers: list[tuple[str, bytes]], body: bytes
) -> None:
    response = https.post(
        f"/webhooks/{source}", content=body, headers=[(k.encode(), v) for k, v in headers]
    )
    assert 400 <= response.status_code < 500, response.text
    payload = response.json()
    assert set(payload) >= {"error_code", "message", "recovery", "documentation"}
    assert "Traceback" not in response.text and "asyncpg" not in response.text


@PROPERTY_SETTINGS
@given(
    body=st.binary(max_size=2048),
    delivery=HEADER_VALUE,
    event=HEADER_VALUE,
)
def test_authentic_requests_with_hostile_content_never_get_a_5xx(
    https: httpx.Client, hook_secrets: Secrets, body: bytes, delivery: bytes, event: bytes
) -> None:
    # Correctly signed, so everything past verification is exercised too: non-UTF-8 or
    # oversized ids and events, bodies that are not JSON objects.
    headers = github_headers(hook_secrets.github, body, delivery="placeholder")
    raw = [
        (k.encode(), v.encode())
        for k, v in headers.items()
        if k not in ("X-GitHub-Delivery", "X-GitHub-Event")
    ]
    raw += [(b"X-GitHub-Delivery", delivery), (b"X-GitHub-Event", event)]
    response = https.post("/webhooks/github", content=body, headers=raw)
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 202, 400), response.text
