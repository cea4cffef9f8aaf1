"""Write docs/webhooks/: the published JSON Schema of the Standard Webhooks task events.

The schema is defined once, in ``mhv_webhook._task_events`` (the gateway validates deliveries
against it); this writes the copy senders read. Run as ``python -m mhv_tools.gen_schemas``
(``make generate``); ``--check`` exits 1 when the published copy is missing or stale.
"""

from __future__ import annotations

import argparse
import json

from mhv_tools._generated import ROOT, sync
from mhv_webhook._task_events import SCHEMA, VERSION

DOCS = ROOT / "docs" / "webhooks"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, verify) the published schema."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the schema is stale")
    args = parser.parse_args(argv)
    want = {
        DOCS / f"task-events.v{VERSION}.schema.json": json.dumps(SCHEMA, indent=2) + "\n",
    }
    return sync(want, DOCS, "*.schema.json", check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
