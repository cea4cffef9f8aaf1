"""The public surface of mhv_cli is what its __all__ says: its modules, no more."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import mhv_cli

EXPECTED = {"devstate", "main", "migrate", "pgcluster", "up"}


def test_exports() -> None:
    assert set(mhv_cli.__all__) == EXPECTED
    for name in EXPECTED:
        module = getattr(mhv_cli, name)
        assert isinstance(module, ModuleType) and module.__name__ == f"mhv_cli.{name}"


def test_every_public_module_is_declared() -> None:
    package = Path(mhv_cli.__file__).parent
    public = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    assert public == EXPECTED
    for name in EXPECTED:
        assert f"\n{name} " in mhv_cli.__doc__, f"{name} is missing from the docstring"
