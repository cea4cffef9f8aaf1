"""`mhv restore`: a backup, and the WAL after it, into a new data folder.

A restore never writes over existing data: the destination must be absent or an empty folder
(MHV-053), so neither a running cluster nor a dead one's remains can be overwritten by mistake.
Three kinds of target:

- latest (the default): the newest backup, then every WAL record the repository received,
  the partial segment pg_receivewal was writing included. With synchronous streaming this is
  every acknowledged commit: the restore of a lost primary.
- ``--target-time``: the newest backup ended before that time, then WAL up to it. The time must
  lie in the recovery window (MHV-052). The restored cluster is promoted at the target.
- ``--target-name``: up to a named restore point (the count marks `mhv backup run` writes).

Restores to a target are side clusters, for looking at or copying out data: their
configuration gets ``synchronous_standby_names = ''`` so their own writes never wait for a WAL
receiver that streams from the primary.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mhv_cli.backup import (
    BackupInfo,
    Progress,
    Repository,
    folder_bytes,
    stream_lines,
    watch,
)
from mhv_common.errors import (
    BackupFailedError,
    BackupNotFoundError,
    RestoreDestinationInUseError,
    RestoreTargetOutOfRangeError,
)

# Barman's phases, as it prints them, worth passing on.
_PHASES = (
    "Starting",
    "Destination",
    "Copying",
    "Decrypting",
    "Generating",
    "Identify",
    "Restore operation completed",
    "Doing PITR",
    "Target",
)


_ATTEMPTS = 3


def _completed_meanwhile(output: str) -> bool:
    return "No such file or directory" in output and "/streaming/" in output


@dataclass(frozen=True, slots=True)
class Restored:
    """The outcome of a restore.

    Attributes:
        backup: The base backup used.
        destination: The new data folder.
        target: What the restore stops at: ``latest``, a time, or a restore point name.
        seconds: Wall time.
        bytes: Size of the restored data folder.
    """

    backup: BackupInfo
    destination: Path
    target: str
    seconds: float
    bytes: int


def check_destination(destination: Path) -> None:
    """Refuse anything but an absent or empty folder (MHV-053)."""
    if not destination.exists():
        return
    if not destination.is_dir():
        raise RestoreDestinationInUseError(f"{destination} exists and is not a folder.")
    entries = sorted(p.name for p in destination.iterdir())
    if not entries:
        return
    pid_file = destination / "postmaster.pid"
    if pid_file.exists():
        pid = pid_file.read_text().split("\n", 1)[0].strip()
        running = pid.isdigit() and Path(f"/proc/{pid}").exists()
        state = f"a PostgreSQL server (pid {pid}) runs on it" if running else "it holds a cluster"
        raise RestoreDestinationInUseError(f"{destination} is a data folder in use: {state}.")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise RestoreDestinationInUseError(f"{destination} is not empty ({shown}).")


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 time with a UTC offset (MHV-052 otherwise)."""
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise RestoreTargetOutOfRangeError(f"{text!r} is not an ISO 8601 time.") from exc
    if moment.tzinfo is None:
        raise RestoreTargetOutOfRangeError(f"{text!r} has no UTC offset; write e.g. {text}+00:00.")
    return moment.astimezone(dt.UTC)


def choose_backup(
    repo: Repository, target_time: dt.datetime | None, backup_id: str | None
) -> tuple[BackupInfo, bool]:
    """The backup to start from, and whether the time target is past the last commit.

    Raises:
        BackupNotFoundError: No (such) completed backup (MHV-050).
        RestoreTargetOutOfRangeError: `target_time` lies outside the window (MHV-052).
    """
    if target_time is None:
        backup = repo.find(backup_id or "latest")
        if not backup.done:
            raise BackupNotFoundError(f"Backup {backup.backup_id} is {backup.status}, not usable.")
        return backup, False
    window = repo.window()
    now = dt.datetime.now(dt.UTC)
    if not window.start <= target_time <= min(window.end, now):
        raise RestoreTargetOutOfRangeError(
            f"{target_time.isoformat(timespec='seconds')} is outside the recoverable window "
            f"{window} (UTC)."
        )
    candidates = [
        b
        for b in repo.completed()
        if b.end_time is not None and b.end_time <= target_time and b.keep != "standalone"
    ] or [b for b in repo.completed() if b.end_time is not None and b.end_time <= target_time]
    if backup_id:
        candidates = [b for b in candidates if b.backup_id == backup_id]
    if not candidates:
        raise RestoreTargetOutOfRangeError(
            f"No backup ended before {target_time.isoformat(timespec='seconds')}"
            + (f" among {backup_id}" if backup_id else "")
            + f"; the window is {window}."
        )
    last_commit = repo.last_commit_time()
    return candidates[-1], last_commit is not None and target_time >= last_commit


def restore(
    repo: Repository,
    destination: Path,
    *,
    target_time: dt.datetime | None = None,
    target_name: str | None = None,
    backup_id: str | None = None,
    out: TextIO | None = None,
) -> Restored:
    """Restore into `destination` (see the module docstring).

    Raises:
        RestoreDestinationInUseError: `destination` is not an absent or empty folder.
        BackupNotFoundError: No repository or no usable backup.
        RestoreTargetOutOfRangeError: The time target lies outside the window.
        BackupFailedError: Barman failed.
    """
    repo.require()
    destination = destination.resolve()
    check_destination(destination)
    backup, past_last_commit = choose_backup(repo, target_time, backup_id)
    args = ["restore", "--partial-wal"]
    if target_name is not None:
        args += ["--target-name", target_name, "--target-action", "promote"]
        target = target_name
    elif target_time is not None and not past_last_commit:
        args += ["--target-time", target_time.isoformat(), "--target-action", "promote"]
        target = target_time.isoformat()
    else:
        target = "latest"
    progress = Progress("restore", backup.cluster_bytes, out=out)
    if past_last_commit:
        progress.say("no commit after the target time: restoring to the latest point instead")
    progress.say(f"backup {backup.backup_id} to {destination}, target {target}")
    started = time.monotonic()

    def on_line(line: str) -> None:
        if line.startswith(_PHASES):
            progress.say(line.rstrip("."))

    def sample() -> tuple[int, str]:
        return folder_bytes(destination) + folder_bytes(repo.staging), ""

    for attempt in range(1, _ATTEMPTS + 1):
        try:
            with watch(progress, sample):
                code, output = stream_lines(
                    repo.command(*args, repo.server, backup.backup_id, str(destination)),
                    env=repo.env(),
                    on_line=on_line,
                    timeout=6 * 3600,
                )
        finally:
            repo._stop_gpg_agent()
        if code == 0:
            break
        if attempt < _ATTEMPTS and _completed_meanwhile(output):
            # The receiver keeps streaming while a point-in-time restore copies its partial
            # segment; one it completed (and renamed) between Barman's listing and its copy is
            # gone by that name. The next listing has it under its final name.
            progress.say("a WAL segment was completed while being copied: restoring again")
            shutil.rmtree(destination, ignore_errors=True)
            continue
        lines = [line for line in output.splitlines() if line.strip()]
        raise BackupFailedError(f"barman restore failed: {' / '.join(lines[-4:])}")
    _own(destination)
    if target != "latest":
        with (destination / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                "\n# Restored by mhv restore to a target: a side cluster. Its writes wait for no\n"
                "# WAL receiver and it archives nothing.\n"
                "synchronous_standby_names = ''\n"
            )
    size = folder_bytes(destination)
    seconds = time.monotonic() - started
    progress.finish(f"restored {size / 2**20:.1f} MiB in {seconds:.1f} s")
    return Restored(backup, destination, target, seconds, size)


def _own(destination: Path) -> None:
    """Give the restored files to whoever runs PostgreSQL here: us.

    Barman unpacks the backup's tar with the owner recorded in it; as root that keeps a
    foreign owner, which PostgreSQL (run in a user namespace by `mhv_cli.pgcluster`) may not
    read.
    """
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0:
        return
    for base, dirs, files in os.walk(destination):
        for name in (*dirs, *files):
            os.lchown(os.path.join(base, name), uid, gid)
    os.lchown(destination, uid, gid)
    destination.chmod(0o700)


def print_next_steps(result: Restored, *, out: TextIO | None = None) -> None:
    """What to do with the restored folder."""
    stream = out or sys.stdout
    lines = [
        f"restored backup {result.backup.backup_id} into {result.destination}",
        f"  target: {result.target}; {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s",
        "next: start PostgreSQL on it (pg_ctl -D <destination> -o '-p <free port>' start);",
        "      recovery replays the WAL, then the cluster accepts connections.",
    ]
    print("\n".join(lines), file=stream)
