"""The public surface of mhv_common is what its __all__ says: its public modules, no more."""

from __future__ import annotations

import subprocess
import sys

import mhv_common
from tests.exports import assert_module_surface

EXPECTED = {
    "admission",
    "auth",
    "client",
    "config",
    "context",
    "db",
    "edge",
    "errors",
    "ids",
    "interceptors",
    "logs",
    "paging",
    "periodic",
    "probes",
    "processes",
    "outbox",
    "ratelimit",
    "redaction",
    "revocation",
    "security",
    "server",
    "structs",
    "timestamps",
    "tls",
    "tracing",
}


def test_exports() -> None:
    assert_module_surface(mhv_common, EXPECTED)


def test_modules_load_on_first_use() -> None:
    # Importing the errors alone must not bring in the server, the pool or the tracing SDK.
    probe = (
        "import sys, mhv_common.errors; "
        "print(sorted(m for m in sys.modules if m.startswith(('mhv_common.', 'asyncpg'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "['mhv_common._catalog', 'mhv_common.errors']"
