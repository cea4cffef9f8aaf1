"""The HTTPS listener: requests HTTP/1.1 cannot parse, and the connection guards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Deployment, Keys
from tests.webhook.conftest import EdgeServer, Secrets, Tls, edge_settings
from tests.webhook.signing import standard_headers
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
    deployment: Deployment, keys: Keys, tls: Tls, hook_secrets: Secrets, tmp_path: Path
) -> Iterator[EdgeServer]:
    """A gateway with tight connection guards: 3 per address, 0.5 s for a TLS handshake and
    0.5 s for a request head."""
    settings = edge_settings(deployment, tls, tmp_path, keys).model_copy(
        update={
            "webhook_tls_handshake_timeout_seconds": 0.5,
            "webhook_head_timeout_seconds": 0.5,
            "webhook_max_connections_per_address": 3,
        }
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


async def _refused(edge: EdgeServer, tls: Tls) -> bool:
    """Whether a TLS connection is refused: its request is never answered."""
    try:
        reader, writer = await asyncio.wait_for(_open(edge, tls), 10)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(12), 10)
    except (ConnectionError, ssl.SSLError):
        return True
    writer.close()
    return not answer.startswith(b"HTTP/1.1 ")


async def test_one_address_cannot_hold_every_connection(guarded_edge: EdgeServer, tls: Tls) -> None:
    before = metric("webhook_connections_closed_total", reason="per_address")
    held = [await _open(guarded_edge, tls) for _ in range(3)]
    # The fourth from the same address is closed at once (before the head timeout matters).
    assert await _refused(guarded_edge, tls)
    assert metric("webhook_connections_closed_total", reason="per_address") - before == 1
    for _reader, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.2)
    # Once they are gone the address is served again.
    async with httpx.AsyncClient(base_url=guarded_edge.url, verify=tls.client_context()) as c:
        assert (await c.get("/healthz")).status_code == 200


async def test_connections_that_never_finish_a_handshake_count_and_are_closed(
    guarded_edge: EdgeServer, tls: Tls
) -> None:
    before = metric("webhook_connections_closed_total", reason="tls_handshake_timeout")
    refused = metric("webhook_connections_closed_total", reason="per_address")
    # Three plain TCP connections that never send a ClientHello fill the address's cap...
    silent = [await asyncio.open_connection("127.0.0.1", guarded_edge.port) for _ in range(3)]
    assert await _refused(guarded_edge, tls)
    assert metric("webhook_connections_closed_total", reason="per_address") - refused == 1
    # ...until the handshake bound closes them.
    for reader, _writer in silent:
        assert await _closed_by_server(reader)
    assert metric("webhook_connections_closed_total", reason="tls_handshake_timeout") - before == 3
    for _reader, writer in silent:
        writer.close()
    async with httpx.AsyncClient(base_url=guarded_edge.url, verify=tls.client_context()) as c:
        assert (await c.get("/healthz")).status_code == 200


# --- Request framing (RFC 9112): what a proxy in front could read differently -------------

SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(*headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = b"POST /webhooks/generic HTTP/" + version + b"\r\nHost: x\r\n"
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def _signed(headers: dict[str, str]) -> tuple[bytes, ...]:
    """Headers that pass the Standard Webhooks precheck, so the edge reads the body."""
    return tuple(f"{name}: {value}".encode() for name, value in headers.items())


async def _responses(edge: EdgeServer, tls: Tls, data: bytes) -> tuple[list[int], bytes, bool]:
    """(statuses answered, the first answer's body, whether the server then closed)."""
    reader, writer = await _open(edge, tls)
    writer.write(data)
    await writer.drain()
    statuses: list[int] = []
    first = b""
    closed = False
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            found = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
            body = await asyncio.wait_for(reader.readexactly(int(found.group(1))), 10)  # type: ignore[union-attr]
            statuses.append(int(head.split(b" ")[1]))
            first = first or body
    except asyncio.IncompleteReadError as exc:
        closed = exc.partial == b""
    except (ConnectionError, ssl.SSLError):
        closed = True
    except TimeoutError:
        closed = False
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return statuses, first, closed


REFUSED_FRAMINGS = {
    "content-length-and-chunked": _post(
        b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "chunked-and-content-length": _post(
        b"Transfer-Encoding: chunked", b"Content-Length: 40", body=b"0\r\n\r\n" + SMUGGLED
    ),
    "chunked-and-zero-length": _post(
        b"Content-Length: 0", b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "conflicting-lengths": _post(b"Content-Length: 0", b"Content-Length: 5", body=b"hello"),
    "conflicting-length-list": _post(b"Content-Length: 0, 5", body=b"hello"),
    "length-with-sign": _post(b"Content-Length: +5", body=b"hello"),
    "negative-length": _post(b"Content-Length: -1", body=SMUGGLED),
    "hex-length": _post(b"Content-Length: 0x5", body=b"hello"),
    "length-with-letters": _post(b"Content-Length: 5a", body=b"hello"),
    "length-in-exponent": _post(b"Content-Length: 1e1", body=b"helloworld"),
    "empty-length": _post(b"Content-Length: ", body=SMUGGLED),
    "gzip": _post(b"Transfer-Encoding: gzip", body=SMUGGLED),
    "gzip-then-chunked": _post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
    "chunked-then-gzip": _post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"),
    "identity": _post(b"Transfer-Encoding: identity", b"Content-Length: 0"),
    "chunked-then-identity": _post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
    "chunked-twice": _post(
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"
    ),
    "not-quite-chunked": _post(b"Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "chunked-in-http-1.0": _post(
        b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED, version=b"1.0"
    ),
    "folded-header": _post(b"X-Note: a", b" b", b"Content-Length: 0"),
    "folded-transfer-encoding": _post(
        b"Transfer-Encoding:", b" chunked", b"Content-Length: 0", body=b"0\r\n\r\n"
    ),
    "folded-content-length": _post(b"Content-Length:", b"\t5", body=b"hello"),
    "folded-after-empty-lines": b"\r\n\r\n" + _post(b"X-Note: a", b" b", b"Content-Length: 0"),
    "space-before-colon": _post(b"Content-Length : 5", body=b"hello"),
    "transfer-encoding-with-vertical-tab": _post(
        b"Transfer-Encoding: \x0bchunked", body=b"0\r\n\r\n"
    ),
    "bare-cr-in-value": _post(b"X-Note: a\rb", b"Content-Length: 0"),
    "nul-in-value": _post(b"X-Note: a\x00b", b"Content-Length: 0"),
}


@pytest.mark.parametrize("request_bytes", REFUSED_FRAMINGS.values(), ids=REFUSED_FRAMINGS.keys())
async def test_ambiguous_framing_is_refused_and_the_connection_closed(
    edge: EdgeServer, tls: Tls, request_bytes: bytes
) -> None:
    statuses, body, closed = await _responses(edge, tls, request_bytes + SMUGGLED)
    # One answer, 400 with the catalog's body, and nothing read after it: a request hidden
    # behind the refused one is never answered.
    assert statuses == [400]
    assert json.loads(body)["error_code"] == "MHV-003"
    assert closed


BAD_CHUNKS = {
    "letters": b"zz\r\nhello\r\n0\r\n\r\n",
    "negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "hex-prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "overflowing": b"fffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    "longer-than-its-size": b"3\r\nhello\r\n0\r\n\r\n",
    "no-line-end-after-data": b"5\r\nhelloX0\r\n\r\n",
}


@pytest.mark.parametrize("chunks", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
async def test_malformed_chunks_are_refused_and_the_connection_closed(
    edge: EdgeServer, tls: Tls, hook_secrets: Secrets, chunks: bytes
) -> None:
    # A head the edge accepts, so that it is reading the body when the chunks go wrong.
    headers = standard_headers(
        hook_secrets.generic, b"{}", msg_id=f"msg_{uuid.uuid4().hex}", timestamp=int(time.time())
    )
    request = _post(*_signed(headers), b"Transfer-Encoding: chunked", body=chunks)
    statuses, body, closed = await _responses(edge, tls, request + SMUGGLED)
    assert statuses == [400]
    assert json.loads(body)["error_code"] == "MHV-003"
    assert closed


@pytest.mark.parametrize(
    "framing",
    [
        (b"Content-Length: 5", b"Content-Length: 5"),
        (b"Content-Length: 5, 5",),
        (b"Content-Length:  5 ",),
        (b"Transfer-Encoding: Chunked",),
    ],
    ids=["repeated-length", "repeated-length-list", "spaces-around-length", "chunked-any-case"],
)
async def test_unambiguous_framings_end_where_every_reader_ends_them(
    edge: EdgeServer, tls: Tls, framing: tuple[bytes, ...]
) -> None:
    chunked = b"Transfer-Encoding" in framing[0]
    body = b"5\r\nhello\r\n0\r\n\r\n" if chunked else b"hello"
    # Unsigned: the edge refuses the post; the request after it is read from where the
    # body ends, and answered.
    statuses, _, _ = await _responses(edge, tls, _post(*framing, body=body) + SMUGGLED)
    assert statuses[1:] == [200]
    assert 400 <= statuses[0] < 500
