"""The HTTPS listener: uvicorn serving the edge over TLS 1.2+ on a socket bound at start-up.

Checks of the connection itself belong here, below the middleware: uvicorn's HTTP/1.1
protocol with the guards it lacks (a TLS handshake timeout, a head timeout, connections per
address counted from the accept, request framing that cannot be read two ways, the JSON 400
for requests it cannot parse) and a transport that corks writes and lingers before closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
from pathlib import Path
from typing import Any, NoReturn

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mhv_common.admission import Admission
from mhv_common.errors import ConfigurationError, ValidationError
from mhv_common.tls import no_passphrase
from mhv_webhook._metrics import CONNECTIONS_REFUSED

logger = logging.getLogger(__name__)

# How long a connection whose request body was refused unread (413) stays open, not reading,
# before it is closed.
LINGER_SECONDS = 2.0
BACKLOG = 2048
MAX_INCOMPLETE_HEAD_BYTES = 16 * 1024


class _GatewayTransport:
    """uvicorn's transport with two changes: writes are corked, and closing may linger.

    Corking: uvicorn writes a response's head and body separately, and over TLS each write
    becomes its own record and its own send() system call. Writes made within one turn of the
    event loop are joined and handed over once, so a response costs one record and one call.

    Lingering: closing a TCP socket with unread data in its receive buffer makes the kernel
    send a reset, and a reset can destroy the 413 answer before the sender has read it. So
    when the gateway refuses a body it has not read, reading is paused (the sender's window
    fills and it stalls; nothing more is read or buffered) and the socket closes a moment
    later, after the sender has had time to read the answer.
    """

    def __init__(self, inner: asyncio.Transport, protocol: H11Protocol) -> None:
        self._inner = inner
        self._protocol = protocol
        self._closing = False
        self._corked: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._corked:
            asyncio.get_running_loop().call_soon(self._flush)
        self._corked.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def _flush(self) -> None:
        if self._corked:
            data = b"".join(self._corked)
            self._corked.clear()
            if not self._inner.is_closing():
                self._inner.write(data)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + sum(len(c) for c in self._corked)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._flush()
        if self._protocol.conn.their_state is h11.SEND_BODY:
            self._inner.pause_reading()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, self._inner.close)
        else:
            self._inner.close()

    def is_closing(self) -> bool:
        return self._closing or self._inner.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# A line of the request head that starts with a space or tab: obs-fold, a header value
# continued on the next line (RFC 9112 section 5.2), which parsers disagree on.
_FOLDED_LINE = re.compile(rb"\n[ \t]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class _StrictConnection(h11.Connection):
    """h11's server side, refusing request framing that another parser may read differently.

    A proxy in front of the gateway and the gateway must agree where each request ends, or
    a second request can hide in the first one's body (request smuggling). h11 already
    refuses conflicting or malformed ``Content-Length`` values, transfer codings other than
    ``chunked``, malformed chunk sizes and invalid header lines. It accepts, and resolves
    its own way, three framings RFC 9112 lets a server refuse, and which are refused here
    with 400 and the connection closed:

    - ``Content-Length`` together with ``Transfer-Encoding`` (section 6.3: "ought to be
      handled as an error");
    - ``Transfer-Encoding`` in an HTTP/1.0 request (section 6.1: the framing is faulty);
    - obs-fold, a header line continued on the next one (section 5.2).

    Repeats of one ``Content-Length`` value (``5, 5``) are taken as that value, as section
    8.6 of RFC 9110 allows: every reader finds the same length.
    """

    def next_event(self) -> Any:
        if self.their_state is h11.IDLE:
            # The head of the next request is at the start of what is still unread (after
            # any empty lines, which are skipped), at most the incomplete-head bound long.
            unread = self.trailing_data[0]
            start = len(unread) - len(unread.lstrip(b"\r\n"))
            end = _HEAD_END.search(unread, start)
            if _FOLDED_LINE.search(unread, start, end.start() + 1 if end else len(unread)):
                self._refuse("a header line is folded (obs-fold)")
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}
            if b"transfer-encoding" in names:
                if b"content-length" in names:
                    self._refuse("both Content-Length and Transfer-Encoding")
                if event.http_version != b"1.1":
                    self._refuse("Transfer-Encoding in an HTTP/1.0 request")
        return event

    @staticmethod
    def _refuse(why: str) -> NoReturn:
        # What h11 raises for what it refuses itself: uvicorn answers it (`send_400_response`)
        # and closes the connection, and no request reaches the application.
        raise h11.RemoteProtocolError(f"ambiguous request framing: {why}", 400)


class _GatewayH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol over TLS it sets up itself, with the guards uvicorn lacks.

    - Connections are counted from the moment they are accepted, before TLS: at most
      `per_address` per client address (0: no cap), so one address cannot take every slot,
      not even with connections that never finish a handshake. Behind a proxy every
      connection comes from the proxy: set 0.
    - The TLS handshake must finish within `handshake_timeout` of the accept (asyncio's own
      bound is 60 s), or the connection is closed.
    - A request head must then arrive within `head_timeout` of the handshake, or of its
      first byte after a response: a connection that sends nothing, or trickles its headers,
      is closed instead of holding one of the `limit_concurrency` slots for good.

    uvicorn is given no TLS context: each accepted connection is secured here with
    `loop.start_tls`, and uvicorn's protocol starts on the secured transport (a
    `_GatewayTransport`). `serve` makes a subclass with the configured values;
    `open_per_address` and `handshakes` are per listener.
    """

    tls: ssl.SSLContext
    handshake_timeout: float = 10.0
    head_timeout: float = 10.0
    per_address: int = 0
    open_per_address: dict[str, int] = {}
    handshakes: set[asyncio.Task[None]] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The same bound on an incomplete request head as uvicorn's (h11's default).
        limit = self.config.h11_max_incomplete_event_size or MAX_INCOMPLETE_HEAD_BYTES
        self.conn = _StrictConnection(h11.SERVER, limit)
        self._address = ""
        self._counted = False
        self._secured = False
        self._lost = False
        self._early: list[bytes] = []
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A TCP connection was accepted: count it, then secure it."""
        peer = transport.get_extra_info("peername")
        self._address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        counts = type(self).open_per_address
        counts[self._address] = counts.get(self._address, 0) + 1
        self._counted = True
        if self.per_address and counts[self._address] > self.per_address:
            CONNECTIONS_REFUSED.labels("per_address").inc()
            transport.abort()
            return
        # Nothing is read until `loop.start_tls` has the connection: a ClientHello read
        # before would be lost to the handshake.
        transport.pause_reading()
        handshake = self.loop.create_task(self._secure(transport))
        type(self).handshakes.add(handshake)
        handshake.add_done_callback(type(self).handshakes.discard)

    async def _secure(self, raw: asyncio.Transport) -> None:
        try:
            async with asyncio.timeout(self.handshake_timeout):
                secured = await self.loop.start_tls(
                    raw,
                    self,
                    self.tls,
                    server_side=True,
                    # asyncio's own bound, behind ours.
                    ssl_handshake_timeout=self.handshake_timeout + 1.0,
                )
        except TimeoutError:
            CONNECTIONS_REFUSED.labels("tls_handshake_timeout").inc()
            self._handshake_failed(raw)
            return
        except (OSError, asyncio.CancelledError):
            # Not TLS, a refused certificate, a reset, or the listener stopping.
            self._handshake_failed(raw)
            return
        if self._lost or secured is None:
            if secured is not None:
                secured.abort()
            return
        self._secured = True
        super().connection_made(_GatewayTransport(secured, self))  # type: ignore[arg-type]
        self._arm_head_timer()
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def _handshake_failed(self, raw: asyncio.Transport) -> None:
        if not raw.is_closing():
            raw.abort()
        self._release()

    def _release(self) -> None:
        if not self._counted:
            return
        self._counted = False
        counts = type(self).open_per_address
        left = counts.get(self._address, 1) - 1
        if left > 0:
            counts[self._address] = left
        else:
            counts.pop(self._address, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._head_timer is not None:
            self._head_timer.cancel()
        if self._secured:
            super().connection_lost(exc)
        else:
            self._lost = True

    def data_received(self, data: bytes) -> None:
        if not self._secured:
            # Sent right behind the handshake, delivered before `_secure` resumes.
            self._early.append(bytes(data))
            return
        # The first bytes of a further request on a kept-alive connection start its clock.
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_timer()
        super().data_received(data)

    def _arm_head_timer(self) -> None:
        waiting_for = self.cycle
        if self._head_timer is not None:
            self._head_timer.cancel()

        def expire() -> None:
            self._head_timer = None
            # Still no new request since the clock started: give the slot back.
            if self.cycle is waiting_for and not self.transport.is_closing():
                CONNECTIONS_REFUSED.labels("head_timeout").inc()
                self.transport.close()

        self._head_timer = self.loop.call_later(self.head_timeout, expire)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self._head_timer is not None:
            # A request head arrived: its body has the body timeout.
            self._head_timer.cancel()
            self._head_timer = None

    def send_400_response(self, msg: str) -> None:
        """Answer a request HTTP/1.1 itself cannot parse with the catalog's JSON body.

        uvicorn would answer in plain text (and has logged the event already). A request
        whose body turns out malformed after the answer has begun (an early 401) only has its
        connection closed.
        """
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.transport.close()
            return
        error = ValidationError(
            "The request is not valid HTTP/1.1 (malformed or oversized request line or headers)."
        )
        body = json.dumps(error.to_dict()).encode()
        head = h11.Response(
            status_code=400,
            reason=b"Bad Request",
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        )
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def tls_context(cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext:
    """A server TLS context refusing anything older than TLS 1.2.

    Raises:
        ConfigurationError: Certificate or key unset, unreadable or not matching.

    """
    if cert_file is None or key_file is None:
        raise ConfigurationError(
            "MHV_WEBHOOK_TLS_CERT_FILE and MHV_WEBHOOK_TLS_KEY_FILE must name the gateway's "
            "certificate and key (PEM); `mhv up` creates a self-signed pair."
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"Cannot load the gateway's TLS certificate {cert_file.name} with key {key_file.name}."
        ) from exc
    return ctx


class HttpsListener:
    """Serves an ASGI app over TLS until the service's stop event is set.

    The socket is bound by `bind` during service start-up, so a port that cannot be had stops
    the service before it reports healthy. On stop, the listener drains before it closes: new
    requests are answered 503 with Retry-After (`admission`, MHV-016) while those in progress
    finish, for at most `drain_seconds`; then the socket closes.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        keep_alive_seconds: int = 75,
        reuse_port: bool = False,
        max_concurrency: int = 1024,
        head_timeout_seconds: float = 10.0,
        handshake_timeout_seconds: float = 10.0,
        max_connections_per_address: int = 0,
        admission: Admission | None = None,
        drain_seconds: float = 10.0,
    ) -> None:
        self._admission = admission
        self._drain_seconds = drain_seconds
        self._reuse_port = reuse_port
        self._max_concurrency = max_concurrency
        self._protocol: type[_GatewayH11Protocol] = type(
            "GatewayH11Protocol",
            (_GatewayH11Protocol,),
            {
                "tls": tls,
                "handshake_timeout": handshake_timeout_seconds,
                "head_timeout": head_timeout_seconds,
                "per_address": max_connections_per_address,
                "open_per_address": {},
                "handshakes": set(),
            },
        )
        # Idle connections are kept longer than clients and proxies keep theirs (60 s is
        # common): the side that closes an idle connection must be the one that would reuse
        # it, or a request sent just as the server closes is lost in transit ("server
        # disconnected without sending a response").
        self._app = app
        self._host = host
        self._port = port
        self._keep_alive = keep_alive_seconds
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        if self._socket is None:
            return 0
        return int(self._socket.getsockname()[1])

    def bind(self) -> None:
        """Bind the listening socket.

        Raises:
            OSError: The address is in use or not allowed.

        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self._reuse_port:
            # Several gateway processes accept on one port; the kernel balances connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        sock.listen(BACKLOG)
        sock.setblocking(False)
        self._socket = sock
        logger.info("https listener bound", extra={"https_port": self.port})

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set; return after in-flight requests finished."""
        if self._socket is None:
            self.bind()
        assert self._socket is not None
        config = uvicorn.Config(
            self._app,
            http=self._protocol,
            backlog=BACKLOG,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=self._keep_alive,
            # Connections plus tasks in flight beyond this get 503 at once, so a flood of slow
            # senders cannot make the gateway buffer bodies without bound.
            limit_concurrency=self._max_concurrency,
            # No TLS context: the protocol secures each connection itself (counted and
            # bounded in time from the accept).
            # A request still running this long after the drain is cancelled: shutdown ends.
            timeout_graceful_shutdown=max(1, round(self._drain_seconds)),
        )
        server = uvicorn.Server(config)

        async def request_exit() -> None:
            await stop.wait()
            if self._admission is not None:
                # New requests get 503 + Retry-After; those in progress finish first.
                self._admission.drain()
                await self._admission.idle(timeout=self._drain_seconds)
            server.should_exit = True

        watcher = asyncio.create_task(request_exit())
        try:
            # Server.serve() would install its own SIGTERM/SIGINT handlers and take shutdown
            # away from the service runtime, which stops the listeners in a fixed order; the
            # inner _serve runs the same start-up, loop and graceful shutdown without them.
            await server._serve(sockets=[self._socket])
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self._socket.close()
            # Connections still in their handshake never became requests: drop them.
            handshakes = list(self._protocol.handshakes)
            for handshake in handshakes:
                handshake.cancel()
            await asyncio.gather(*handshakes, return_exceptions=True)
            # A request cut off by the graceful-shutdown timeout leaves its connection open.
            for connection in list(server.server_state.connections):
                connection.transport.abort()
            await asyncio.sleep(0)
        if not stop.is_set():
            raise RuntimeError("the HTTPS listener stopped on its own")
