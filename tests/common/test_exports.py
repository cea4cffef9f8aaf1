"""The public surface of mhv_common is what its __all__ says: its public modules, no more."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import mhv_common

EXPECTED = {
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
    "ratelimit",
    "redaction",
    "server",
    "timestamps",
    "tls",
    "tracing",
}


def test_exports() -> None:
    assert set(mhv_common.__all__) == EXPECTED
    for name in EXPECTED:
        module = getattr(mhv_common, name)
        assert isinstance(module, ModuleType) and module.__name__ == f"mhv_common.{name}"


def test_every_public_module_is_declared() -> None:
    # A new module is either part of the surface (add it to __all__ and the docstring's table)
    # or private (name it _like_this).
    package = Path(mhv_common.__file__).parent
    public = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    assert public == EXPECTED
    for name in EXPECTED:
        assert f"\n{name} " in mhv_common.__doc__, f"{name} is missing from the docstring"


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
