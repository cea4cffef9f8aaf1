"""The layers around ``POST /webhooks/{source}``: the body cap, the address budget, and the
answer every refusal gets (request id, metrics with the final status)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.harness import Deployment, Keys
from tests.webhook.conftest import EdgeServer, Secrets, Tls, edge_settings
from tests.webhook.signing import standard_headers
from tests.webhook.support import assert_error, metric

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


def test_every_refusal_is_named_and_counted_with_the_status_sent(
    client: httpx.Client, hook_secrets: Secrets
) -> None:
    # The error body is written inside the metrics and request-id layers: what they record
    # is what the sender got.
    before = {
        (code, outcome): (
            metric("webhook_requests_total", source="generic", code=code),
            metric("webhook_deliveries_total", source="generic", outcome=outcome),
        )
        for code, outcome in (("401", "bad_signature"), ("400", "malformed"))
    }
    unsigned = client.post("/webhooks/generic", content=b"{}")
    assert_error(unsigned, 401, "MHV-300")
    listed = b"[1, 2]"
    authentic = standard_headers(
        hook_secrets.generic, listed, msg_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time())
    )
    not_an_object = client.post("/webhooks/generic", content=listed, headers=authentic)
    assert_error(not_an_object, 400, "MHV-003")
    for response in (unsigned, not_an_object):
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert unsigned.headers["x-request-id"] != not_an_object.headers["x-request-id"]
    for (code, outcome), (requests, deliveries) in before.items():
        assert metric("webhook_requests_total", source="generic", code=code) == requests + 1
        assert (
            metric("webhook_deliveries_total", source="generic", outcome=outcome) == deliveries + 1
        )


def test_requests_per_client_address_are_limited_before_verification(
    deployment: Deployment, keys: Keys, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> None:
    settings = edge_settings(deployment, tls, tmp_path, keys).model_copy(
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
