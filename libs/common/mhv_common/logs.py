"""Structured JSON logs, one object per line, stamped with the request and trace ids.

Log records never carry secrets: `redact` masks values whose key looks secret, and the access
log records only method, principal, code and latency, never request bodies.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
from opentelemetry import trace

from mhv_common import context

# Keys whose values must never be logged or stored in clear, wherever they appear.
SECRET_KEY_PATTERN = re.compile(
    r"(token|secret|passw(or)?d|api[_-]?key|authorization|signature|private[_-]?key|credential)",
    re.IGNORECASE,
)

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


@functools.lru_cache(maxsize=4096)
def _secret_key(key: str) -> bool:
    # The same few keys come in every log line: match each once.
    return SECRET_KEY_PATTERN.search(key) is not None


def redact(value: Any, *, mask: str = "[REDACTED]") -> Any:
    """Return a copy of `value` with every secret-looking key's value replaced by `mask`."""
    if isinstance(value, Mapping):
        return {
            k: (mask if _secret_key(str(k)) else redact(v, mask=mask)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, mask=mask) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """Formats records as single-line JSON with request and trace context."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service
        # Lines come many per second: the date and time to the second is rendered once.
        self._second = -1
        self._stamp = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one JSON line."""
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = context.current()
        if ctx is not None:
            entry["request_id"] = ctx.request_id
            entry["method"] = ctx.method
            if ctx.principal is not None:
                entry["principal"] = ctx.principal.subject
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = f"{span.trace_id:032x}"
            entry["span_id"] = f"{span.span_id:016x}"
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        entry.update(redact(extras))
        if record.exc_info:
            # Tracebacks stay in the operator's log; they never reach a caller.
            entry["exception"] = self.formatException(record.exc_info)
        try:
            # orjson: the same JSON (UTF-8 as is, compact) several times faster.
            return orjson.dumps(entry, default=str).decode()
        except (orjson.JSONEncodeError, TypeError):
            # What orjson refuses (integers beyond 64 bits, keys that are not text).
            return json.dumps(entry, default=str, ensure_ascii=False)


def configure(service: str, *, level: str = "INFO", fmt: str = "json") -> None:
    """Send the root logger to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    # No record needs the caller's file and line, thread or process names: collecting them
    # (a walk up the stack on every line) was most of the access log's cost. The logging
    # HOWTO's "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter at INFO drowns the access log.
    for noisy in ("asyncio", "grpc", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
