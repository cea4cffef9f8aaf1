"""Write docs/errors/: one page per MHV code and an index, all from the error catalog.

Run as ``python -m mhv_tools.gen_error_docs`` (``make generate``); ``--check`` exits 1 when a
page is missing, stale, or left over from a removed code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mhv_common._catalog import CATALOG, ErrorSpec
from mhv_tools._generated import ROOT, sync

DOCS = ROOT / "docs" / "errors"
NOTICE = "<!-- Generated from libs/common/mhv_common/_catalog.py by `make generate`. -->\n"


def page(spec: ErrorSpec) -> str:
    """The Markdown page of one code."""
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(spec.recovery, 1))
    extras = ", `BadRequest` field violations" if spec.code == "MHV-003" else ""
    extras += ", `RetryInfo`" if spec.retryable else ""
    retry = (
        "Yes. The error carries `RetryInfo` (gRPC) or `Retry-After` (HTTP); wait that long."
        if spec.retryable
        else "Not unchanged: fix the cause first."
    )
    return f"""{NOTICE}
# {spec.code} {spec.name}

{spec.title}

| | |
|---|---|
| gRPC status | `{spec.grpc_status.name}` |
| HTTP status | `{spec.http_status}` |
| `ErrorInfo.reason` | `{spec.name}` |
| `ErrorInfo.domain` | `mahavishnu` |
| Retry | {retry} |

## What to do

{steps}

## How it reaches you

- gRPC: status `{spec.grpc_status.name}`, message starting with `[{spec.code}]`, and a
  `google.rpc.Status` in the `grpc-status-details-bin` trailer holding `ErrorInfo`
  (metadata `error_code={spec.code}`), `Help` linking here{extras}.
- HTTP: status {spec.http_status} with the JSON body
  `{{"error_code": "{spec.code}", "message": ..., "recovery": [...], "documentation": ...}}`.
"""


def index() -> str:
    """The table of all codes."""
    rows = "\n".join(
        f"| [{s.code}]({s.code.lower()}.md) | `{s.name}` | `{s.grpc_status.name}` | "
        f"{s.http_status} | {s.title} |"
        for s in CATALOG
    )
    return f"""{NOTICE}
# Error codes

Every error a caller sees carries one of these codes. Ranges: MHV-001..099 system
(MHV-050..069: operators' backup, restore and migration commands), MHV-100..199 tasks and
users, MHV-200..299 repositories, MHV-300..399 webhooks and external integrations,
MHV-400..499 audit log.

| Code | Name | gRPC | HTTP | Meaning |
|---|---|---|---|---|
{rows}
"""


def expected() -> dict[Path, str]:
    """Every file docs/errors/ should hold, with its content."""
    files = {DOCS / "README.md": index()}
    for spec in CATALOG:
        files[DOCS / f"{spec.code.lower()}.md"] = page(spec)
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the pages, or with --check report drift."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    return sync(expected(), DOCS, "*.md", check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
