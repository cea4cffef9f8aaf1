"""Checks for a package whose public surface is a set of modules (mhv_common, mhv_cli)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


def assert_module_surface(package: ModuleType, expected: set[str]) -> None:
    """`package.__all__` names exactly `expected`, and those are its public modules.

    Each name resolves to the package's module of that name and has a line in the docstring's
    table; every module file not named ``_like_this`` is among them, so a new module is either
    declared part of the surface or private.
    """
    assert set(package.__all__) == expected
    for name in expected:
        module = getattr(package, name)
        assert isinstance(module, ModuleType) and module.__name__ == f"{package.__name__}.{name}"
        assert f"\n{name} " in (package.__doc__ or ""), f"{name} is missing from the docstring"
    assert package.__file__ is not None
    files = Path(package.__file__).parent.glob("*.py")
    assert {p.stem for p in files if not p.stem.startswith("_")} == expected
