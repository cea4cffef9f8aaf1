"""The ``mhv backup`` and ``mhv restore`` commands (argument parsing and output only).

- ``mhv backup init``: create the repository for the database (``MHV_DATABASE_URL``, or the
  one `mhv up` runs).
- ``mhv backup run``: take a full backup now (progress on stderr), keep it 30 days, and write
  its count mark.
- ``mhv backup list`` / ``mhv backup info [ID]``: what the repository holds, the recovery
  window, the WAL stream.
- ``mhv backup check``: every precondition of a backup, one per line.
- ``mhv backup receive``: stream WAL into the repository (foreground; the service a backup
  host runs), with Barman's periodic work every minute.
- ``mhv backup verify``: restore the latest backup into a scratch cluster and check it
  (the same as ``scripts/verify-backups.py``).
- ``mhv backup exporter``: serve the backup metrics for Prometheus.
- ``mhv restore --destination DIR [--target-time T | --target-name NAME]``.

The repository is ``MHV_BACKUP_HOME`` (default ``.mhv/backup``) and the Barman server in it
``MHV_BACKUP_SERVER`` (default ``mahavishnu``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mhv_cli.backup import Connection, Repository, blocking_failures, run_backup
from mhv_cli.restore import parse_time, print_next_steps, restore


def _repo(args: argparse.Namespace) -> Repository:
    kwargs: dict[str, Any] = {}
    if args.home:
        kwargs["home"] = Path(args.home).resolve()
    if args.server:
        kwargs["server"] = args.server
    return Repository(**kwargs)


def _init(args: argparse.Namespace) -> int:
    from mhv_cli.main import admin_url

    repo = _repo(args)
    primary = Connection.from_url(args.database_url or admin_url())
    repo.init(primary, pg_bin=Path(args.pg_bin) if args.pg_bin else None)
    print(
        f"backup repository {repo.home} (server {repo.server!r}) for {primary.host}:{primary.port}"
    )
    print(f"  encryption key and passphrase: {repo.gnupg}, {repo.passphrase_file}")
    print(
        "  the primary needs: "
        "synchronous_standby_names = 'barman_receive_wal', then `mhv backup receive`"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    result = run_backup(_repo(args))
    backup = result.backup
    rate = result.database_bytes / result.seconds / 2**20 if result.seconds else 0.0
    print(
        f"backup {backup.backup_id}: {result.database_bytes / 2**20:.1f} MiB of databases in "
        f"{result.seconds:.1f} s ({rate:.1f} MiB/s), {backup.size_bytes / 2**20:.1f} MiB stored"
        f" (compressed, encrypted); count mark {result.mark_path.name}"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    backups = _repo(args).backups()
    if args.json:
        print(json.dumps([b.as_dict() for b in backups], indent=2))
        return 0
    if not backups:
        print("no backups yet (take one with `mhv backup run`)")
        return 0
    print(f"{'backup id':<17} {'status':<8} {'ended (UTC)':<20} {'stored':>10}  kept")
    for b in backups:
        ended = b.end_time.strftime("%Y-%m-%d %H:%M:%S") if b.end_time else "-"
        print(
            f"{b.backup_id:<17} {b.status:<8} {ended:<20} {b.size_bytes / 2**20:>8.1f} M"
            f"  {b.keep or 'window'}"
        )
    return 0


def _info(args: argparse.Namespace) -> int:
    repo = _repo(args)
    repo.require()
    info: dict[str, Any] = {
        "repository": str(repo.home),
        "server": repo.server,
        "system_id": repo.recorded_system_id(),
        "retention": "point in time: 7 days; full backups: 30 days (standalone)",
    }
    if args.backup_id:
        backup = repo.find(args.backup_id)
        info["backup"] = backup.as_dict()
    backups = repo.completed()
    info["completed_backups"] = len(backups)
    if backups:
        window = repo.window()
        info["recovery_window"] = {"start": window.start.isoformat(), "end": window.end.isoformat()}
        info["latest_backup"] = backups[-1].backup_id
    last = repo.last_wal_time()
    info["last_wal_received"] = last.isoformat() if last else None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key.replace('_', ' ')}: {value}")
    return 0


def _check(args: argparse.Namespace) -> int:
    checks = _repo(args).check()
    for name, (ok, hint) in sorted(checks.items()):
        print(f"{'ok    ' if ok else 'FAILED'} {name}{': ' + hint if hint else ''}")
    failures = blocking_failures(checks)
    if failures:
        print(f"backups cannot run: {len(failures)} blocking check(s) failed", file=sys.stderr)
        return 1
    return 0


def _receive(args: argparse.Namespace) -> int:
    repo = _repo(args)
    process = repo.start_receiver()
    stop = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"streaming WAL into {repo.home} (pid {process.pid}); Ctrl-C stops", flush=True)
    next_maintenance = time.monotonic()
    try:
        while not stop and process.poll() is None:
            if time.monotonic() >= next_maintenance:
                repo.maintain()
                next_maintenance = time.monotonic() + args.maintenance_interval
            time.sleep(0.5)
    finally:
        Repository.stop_receiver(process)
    if not stop:
        print(f"the WAL receiver exited with {process.returncode}", file=sys.stderr)
        return 1
    return 0


def _verify(args: argparse.Namespace) -> int:
    from mhv_cli.verify import main as verify_main

    forwarded = ["--json-out", args.json_out] if args.json_out else []
    if args.home:
        forwarded += ["--home", args.home]
    if args.server:
        forwarded += ["--server", args.server]
    return verify_main(forwarded)


def _exporter(args: argparse.Namespace) -> int:
    from mhv_cli._backup_metrics import serve

    return serve(_repo(args), host=args.host, port=args.port)


def _restore(args: argparse.Namespace) -> int:
    result = restore(
        _repo(args),
        Path(args.destination),
        target_time=parse_time(args.target_time) if args.target_time else None,
        target_name=args.target_name,
        backup_id=args.backup_id,
    )
    print_next_steps(result)
    return 0


def _repository_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="repository folder (default: MHV_BACKUP_HOME, .mhv/backup)")
    parser.add_argument("--server", help="Barman server name (default: MHV_BACKUP_SERVER)")


def add_commands(sub: Any) -> None:
    """Register ``backup`` and ``restore`` on the ``mhv`` subcommand parser `sub`."""
    backup = sub.add_parser("backup", help="backups: init, run, list, info, check, verify, ...")
    actions = backup.add_subparsers(dest="action", required=True)

    init = actions.add_parser("init", help="create the backup repository for the database")
    init.add_argument("--database-url", help="administrator URL (default: MHV_DATABASE_URL)")
    init.add_argument("--pg-bin", help="folder of pg_basebackup and pg_receivewal")
    init.set_defaults(func=_init)

    run = actions.add_parser("run", help="take a full backup now")
    run.set_defaults(func=_run)

    listing = actions.add_parser("list", help="list the backups")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)

    info = actions.add_parser("info", help="repository, recovery window, one backup")
    info.add_argument("backup_id", nargs="?", help="a backup id, or latest")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_info)

    check = actions.add_parser("check", help="check every precondition of a backup")
    check.set_defaults(func=_check)

    receive = actions.add_parser("receive", help="stream WAL into the repository (foreground)")
    receive.add_argument("--maintenance-interval", type=float, default=60.0)
    receive.set_defaults(func=_receive)

    verify = actions.add_parser("verify", help="restore the latest backup and check it")
    verify.add_argument("--json-out", help="also write the JSON report here")
    verify.set_defaults(func=_verify)

    exporter = actions.add_parser("exporter", help="serve backup metrics for Prometheus")
    exporter.add_argument("--host", default="127.0.0.1")
    exporter.add_argument("--port", type=int, default=9104)
    exporter.set_defaults(func=_exporter)

    for parser in (init, run, listing, info, check, receive, verify, exporter):
        _repository_options(parser)

    rest = sub.add_parser("restore", help="restore a backup into a new, empty data folder")
    rest.add_argument("--destination", required=True, help="new data folder (absent or empty)")
    target = rest.add_mutually_exclusive_group()
    target.add_argument("--target-time", help="ISO 8601 time with offset (default: latest)")
    target.add_argument("--target-name", help="a restore point, e.g. a count mark")
    rest.add_argument("--backup-id", help="start from this backup (default: the right one)")
    _repository_options(rest)
    rest.set_defaults(func=_restore)
