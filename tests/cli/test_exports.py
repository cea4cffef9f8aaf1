"""The public surface of mhv_cli is what its __all__ says: its modules, no more."""

from __future__ import annotations

import mhv_cli
from tests.exports import assert_module_surface

EXPECTED = {
    "anchors",
    "backup",
    "credentials",
    "devstate",
    "entrypoint",
    "main",
    "marks",
    "migrate",
    "pgcluster",
    "reindex",
    "restore",
    "up",
    "verify",
}


def test_exports() -> None:
    assert_module_surface(mhv_cli, EXPECTED)
