"""Real listeners on 127.0.0.1 standing in for PagerDuty, Slack, a heartbeat service and SMTP.

Alertmanager delivers to them exactly as it would to the real services (HTTP POSTs of its JSON
payloads, an SMTP session with STARTTLS and AUTH); they record what arrived so a test can look.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mhv_cli.devstate import DevState
from mhv_cli.pgcluster import free_port

T = TypeVar("T")


@dataclass(frozen=True)
class HttpRequest:
    """One request an `HttpSink` received."""

    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class LocalHttpServer:
    """A threaded HTTP server on a free port of 127.0.0.1, for the duration of a `with`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """host:port it listens on."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the test output clean."""

    def log_message(self, format: str, *args: Any) -> None:
        """Do not log each request to stderr."""


class HttpSink(LocalHttpServer):
    """An HTTP server on 127.0.0.1 that records every POST and answers `status`."""

    def __init__(self, *, status: int = 200, reply: bytes = b"ok") -> None:
        self.requests: list[HttpRequest] = []
        self._changed = threading.Condition()
        sink = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                request = HttpRequest(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with sink._changed:
                    sink.requests.append(request)
                    sink._changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        super().__init__(Handler)

    def url(self, path: str = "/") -> str:
        """An http:// URL of this sink."""
        return f"http://{self.address}{path}"

    def wait_for(
        self, predicate: Callable[[HttpRequest], bool], *, timeout: float = 30
    ) -> HttpRequest:
        """The first request matching `predicate`, waiting up to `timeout` seconds for it."""
        return _wait(self._changed, self.requests, predicate, timeout)


def _wait(
    changed: threading.Condition,
    items: list[T],
    predicate: Callable[[T], bool],
    timeout: float,
) -> T:
    """The first of `items` matching `predicate`, waiting on `changed` for new ones."""
    deadline = time.monotonic() + timeout
    with changed:
        while True:
            for item in items:
                if predicate(item):
                    return item
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing matching in {timeout}s among {items!r:.2000}")
            changed.wait(remaining)


@dataclass(frozen=True)
class Mail:
    """One message an `SmtpSink` accepted."""

    mail_from: str
    recipients: list[str]
    message: Message
    login: str
    over_tls: bool


@dataclass
class TlsFiles:
    """A self-signed certificate for localhost and 127.0.0.1 and its key, as PEM files."""

    cert: Path
    key: Path

    @classmethod
    def create(cls, folder: Path) -> TlsFiles:
        """Generate the pair into `folder`, as `mhv up` does for the gateway."""
        state = DevState(folder)
        state.ensure_tls()
        return cls(state.tls_cert, state.tls_key)


@dataclass
class SmtpSink:
    """An SMTP server on 127.0.0.1 that demands STARTTLS and AUTH with one login, as a relay would.

    Accepted messages land in `mails`.
    """

    tls: TlsFiles
    username: str
    password: str
    mails: list[Mail] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert, self.tls.key)
        self._controller = Controller(
            self,
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="smtp.test",
            tls_context=context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            # aiosmtpd prompts LOGIN with "User Name", where Alertmanager (like most clients)
            # expects "Username:"; offering PLAIN only, as many relays do, avoids the mismatch.
            auth_exclude_mechanism=["LOGIN"],
            authenticator=self._authenticate,
        )

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.username
            and auth_data.password.decode() == self.password
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message (aiosmtpd handler hook)."""
        login = session.auth_data.login.decode() if session.auth_data else ""
        mail = Mail(
            mail_from=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            message=message_from_bytes(envelope.original_content or b""),
            login=login,
            over_tls=session.ssl is not None,
        )
        with self._changed:
            self.mails.append(mail)
            self._changed.notify_all()
        return "250 Message accepted for delivery"

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def wait_for(self, predicate: Callable[[Mail], bool], *, timeout: float = 30) -> Mail:
        """The first message matching `predicate`, waiting up to `timeout` seconds for it."""
        return _wait(self._changed, self.mails, predicate, timeout)
