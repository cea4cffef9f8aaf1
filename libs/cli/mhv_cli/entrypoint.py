"""The container image's entrypoint: one image, and its first argument picks what runs.

    task | audit | webhook      that service, in the foreground, as the container's process
    mhv ARGS...                the ``mhv`` command (``migrate``, ``validate-config``, ``token``)

A Deployment or a Job only sets ``args``; everything else comes from ``MHV_*`` variables. The
service runs in this very process (no shell, no fork), so SIGTERM from the container runtime
reaches its graceful shutdown directly.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# Service name -> the module whose `main()` runs it.
SERVICES = {
    "task": "mhv_task.app",
    "audit": "mhv_audit.app",
    "webhook": "mhv_webhook.app",
}
# What the process exits with when the arguments make no sense (sysexits.h EX_USAGE).
EX_USAGE = 64

USAGE = (
    "usage: <image> task | audit | webhook | mhv <command> [options]\n"
    "  task, audit, webhook  run that service; configure it with MHV_* environment variables\n"
    "  mhv ...               the mhv command: migrate, validate-config, token (mhv --help)"
)


def resolve(argv: Sequence[str]) -> Callable[[], object]:
    """What to run for `argv`.

    Raises:
        SystemExit: With EX_USAGE and a message on stderr when `argv` names nothing to run.
    """
    if not argv or argv[0] in ("-h", "--help", "help"):
        _usage_error("" if argv else "error: [MHV-001] no command given.")
    command, rest = argv[0], list(argv[1:])
    if command == "mhv":
        from mhv_cli.main import main as mhv_main

        return lambda: mhv_main(rest)
    if command not in SERVICES:
        _usage_error(f"error: [MHV-001] unknown command {command!r}.")
    if rest:
        _usage_error(
            f"error: [MHV-001] the {command} service takes no arguments ({' '.join(rest)}); "
            "configure it with MHV_* environment variables."
        )
    main: Callable[[], object] = importlib.import_module(SERVICES[command]).main
    return main


def _usage_error(message: str) -> None:
    if message:
        print(message, file=sys.stderr)
    print(USAGE, file=sys.stderr)
    raise SystemExit(EX_USAGE if message else 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run what `argv` (default: the process arguments) names; return its exit status."""
    run = resolve(sys.argv[1:] if argv is None else argv)
    result = run()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
