"""The HTTPS listener: requests HTTP/1.1 cannot parse, and the connection guards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Deployment
from tests.webhook.conftest import EdgeServer, Secrets, Tls, edge_settings
from tests.webhook.support import metric


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


@pytest.fixture
def guarded_edge(
    deployment: Deployment, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> Iterator[EdgeServer]:
    """A gateway with tight connection guards: 3 per address, 0.5 s for a request head."""
    settings = edge_settings(deployment, tls, tmp_path).model_copy(
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
