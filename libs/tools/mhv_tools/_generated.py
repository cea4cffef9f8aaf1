"""Writing generated files, or checking that the committed ones are current."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def sync(want: Mapping[Path, str], folder: Path, pattern: str, *, check: bool) -> int:
    """Make `folder`'s files matching `pattern` exactly `want`, or with `check` report drift.

    Returns the exit status: 0, or 1 when `check` finds a file missing, stale or left over.
    """
    have = {p: p.read_text() for p in folder.glob(pattern)} if folder.exists() else {}
    if check:
        drift = sorted(p for p in set(want) | set(have) if want.get(p) != have.get(p))
        for path in drift:
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            print(f"stale: {shown}: run `make generate`", file=sys.stderr)
        return 1 if drift else 0
    folder.mkdir(parents=True, exist_ok=True)
    for path in set(have) - set(want):
        path.unlink()
    for path, text in want.items():
        path.write_text(text)
    return 0
