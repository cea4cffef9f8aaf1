"""Backups of the Mahavishnu database with Barman: repository, WAL streaming, backups, restores.

One backup repository (``MHV_BACKUP_HOME``, by default ``.mhv/backup/``) holds a Barman
configuration generated here, Barman's catalogue of base backups and WAL, the GnuPG key the
backups are encrypted with, and the count marks `verify-backups` compares a restore with:

- WAL streams synchronously into the repository (``pg_receivewal --synchronous`` run by
  ``barman receive-wal``, application name ``barman_receive_wal``): named in the primary's
  ``synchronous_standby_names``, a commit is acknowledged only once its WAL is on the backup
  host's disk, so losing the primary's disk loses no acknowledged write.
- Base backups (``pg_basebackup`` through Barman) are compressed and encrypted with GnuPG; WAL
  segments are encrypted as they are archived. Only the segment being written
  (``*.partial``) is kept in clear, as pg_receivewal writes it.
- Retention: point-in-time recovery to any moment of the last 7 days (Barman's recovery
  window), and every full backup kept 30 days as a standalone backup (restorable to its own end
  point).

Every command runs Barman (``.tools/barman/bin/barman``, installed by
``deploy/install-tools.sh backup``; ``MHV_BARMAN`` overrides) with this repository's
configuration and environment. See docs/dr/backups.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from mhv_cli.pgcluster import bin_dir_for, binary
from mhv_common.errors import (
    BackupFailedError,
    BackupNotFoundError,
    BackupRepositoryMismatchError,
    ConfigurationError,
)

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_SERVER = "mahavishnu"
# pg_receivewal's application name: what synchronous_standby_names must name.
RECEIVER_NAME = "barman_receive_wal"
SLOT_NAME = "mhv_barman"
RECOVERY_WINDOW_DAYS = 7
FULL_BACKUP_RETENTION_DAYS = 30
# The server settings a primary needs for synchronous WAL streaming into the repository.
PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "synchronous_standby_names": RECEIVER_NAME,
    "synchronous_commit": "on",
}
_BACKUP_ID = re.compile(r"^\d{8}T\d{6}$")


def barman_binary() -> Path:
    """The barman program: ``MHV_BARMAN``, the repository's tools folder, or PATH."""
    given = os.environ.get("MHV_BARMAN")
    if given:
        return Path(given)
    tools = Path(os.environ.get("MHV_TOOLS_DIR", ROOT / ".tools"))
    local = tools / "barman" / "bin" / "barman"
    if local.exists():
        return local
    found = shutil.which("barman")
    if found:
        return Path(found)
    raise ConfigurationError(
        "Barman is not installed.",
        recovery=("Run `make backup-tools` (deploy/install-tools.sh backup), or set MHV_BARMAN.",),
    )


def default_home() -> Path:
    """The repository folder: ``MHV_BACKUP_HOME``, else ``backup/`` in the state folder."""
    given = os.environ.get("MHV_BACKUP_HOME")
    if given:
        return Path(given).resolve()
    from mhv_cli import devstate

    return devstate.home() / "backup"


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """One base backup of the repository.

    Attributes:
        backup_id: Barman's id (its start time, ``YYYYMMDDTHHMMSS``).
        status: ``DONE`` when complete; ``FAILED``, ``STARTED``, ``WAITING_FOR_WALS``.
        begin_time: When it started.
        end_time: When it ended: the earliest moment it can be restored to.
        size_bytes: Size in the repository (compressed, encrypted).
        cluster_bytes: Size of the data folder it restores to.
        keep: Barman's keep target (``standalone``, ``full``) or empty.
    """

    backup_id: str
    status: str
    begin_time: dt.datetime | None
    end_time: dt.datetime | None
    size_bytes: int
    cluster_bytes: int
    keep: str = ""

    @property
    def done(self) -> bool:
        """Whether the backup is complete and usable."""
        return self.status == "DONE"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "backup_id": self.backup_id,
            "status": self.status,
            "begin_time": self.begin_time.isoformat() if self.begin_time else None,
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "size_bytes": self.size_bytes,
            "cluster_bytes": self.cluster_bytes,
            "keep": self.keep,
        }


@dataclass(frozen=True, slots=True)
class Window:
    """The span a point-in-time restore may target.

    Attributes:
        start: End of the oldest backup whose WAL is kept.
        end: The last moment WAL was received.
    """

    start: dt.datetime
    end: dt.datetime

    def __str__(self) -> str:
        start, end = (t.isoformat(timespec="seconds") for t in (self.start, self.end))
        return f"{start} .. {end}"


class Progress:
    """One line of progress for long work: a bar on a terminal, a line per 10 % elsewhere."""

    def __init__(self, label: str, total: int, *, out: TextIO | None = None) -> None:
        self._label = label
        self._total = max(total, 1)
        self._out = out or sys.stderr
        self._tty = self._out.isatty()
        self._started = time.monotonic()
        self._last_step = -1
        self._last_draw = 0.0

    def update(self, done: int, *, note: str = "") -> None:
        """Show `done` bytes (of the total) and an optional note."""
        fraction = min(done / self._total, 1.0)
        elapsed = time.monotonic() - self._started
        text = (
            f"{self._label}: {fraction:4.0%} ({_size(done)} of {_size(self._total)}, "
            f"{elapsed:.0f} s){' ' + note if note else ''}"
        )
        if self._tty:
            if time.monotonic() - self._last_draw >= 0.2:
                self._out.write("\r" + text.ljust(78))
                self._out.flush()
                self._last_draw = time.monotonic()
            return
        step = int(fraction * 10)
        if step > self._last_step:
            self._last_step = step
            print(text, file=self._out, flush=True)

    def say(self, message: str) -> None:
        """A phase change, on its own line."""
        if self._tty:
            self._out.write("\r" + " " * 78 + "\r")
        elapsed = time.monotonic() - self._started
        print(f"{self._label}: {message} ({elapsed:.0f} s)", file=self._out, flush=True)

    def finish(self, message: str) -> None:
        """The last line."""
        self.say(message)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (0 when it does not exist)."""
    total = 0
    for base, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, name)).st_size
    return total


@dataclass(frozen=True, slots=True)
class Connection:
    """Where the repository reaches the primary (an administrator with REPLICATION)."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    @classmethod
    def from_url(cls, url: str) -> Connection:
        """Parse a ``postgresql://user:password@host:port/db`` URL."""
        parts = urlsplit(url)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username or "postgres"),
            password=unquote(parts.password or ""),
            dbname=(parts.path or "/postgres").lstrip("/") or "postgres",
        )

    def conninfo(self, *, replication: bool = False) -> str:
        """Keyword form for Barman (the password stays in the repository's pgpass file).

        Barman's own connection goes to the ``postgres`` maintenance database, which exists
        before the application's and outlives it.
        """
        base = f"host={self.host} port={self.port} user={self.user}"
        return base if replication else f"{base} dbname=postgres"

    def url(self, database: str | None = None) -> str:
        """As a URL, with the password."""
        from urllib.parse import quote

        credentials = quote(self.user, safe="")
        if self.password:
            credentials += ":" + quote(self.password, safe="")
        return f"postgresql://{credentials}@{self.host}:{self.port}/{database or self.dbname}"


@dataclass(frozen=True)
class Repository:
    """A backup repository folder and the Barman server in it."""

    home: Path = field(default_factory=default_home)
    server: str = field(default_factory=lambda: os.environ.get("MHV_BACKUP_SERVER", DEFAULT_SERVER))

    @property
    def config(self) -> Path:
        """The generated Barman configuration."""
        return self.home / "barman.conf"

    @property
    def barman_home(self) -> Path:
        """Barman's own folder: base backups, WAL, catalogue."""
        return self.home / "barman"

    @property
    def server_dir(self) -> Path:
        """The server's part of the catalogue."""
        return self.barman_home / self.server

    @property
    def gnupg(self) -> Path:
        """GnuPG home holding the encryption key."""
        return self.home / "gnupg"

    @property
    def passphrase_file(self) -> Path:
        """Passphrase of the private key (needed to restore, not to back up)."""
        return self.home / "passphrase"

    @property
    def pgpass(self) -> Path:
        """Libpq password file for the primary."""
        return self.home / "pgpass"

    @property
    def connection_file(self) -> Path:
        """Where the primary is (without its password)."""
        return self.home / "primary.json"

    @property
    def marks_dir(self) -> Path:
        """Count marks taken after each backup (see `take_mark`)."""
        return self.home / "marks"

    @property
    def verification_dir(self) -> Path:
        """Results of backup verifications."""
        return self.home / "verification"

    @property
    def log_file(self) -> Path:
        """Barman's log."""
        return self.home / "barman.log"

    def exists(self) -> bool:
        """Whether the repository was initialised."""
        return self.config.is_file()

    def require(self) -> None:
        """Raise MHV-050 unless the repository was initialised."""
        if not self.exists():
            raise BackupNotFoundError(
                f"No backup repository in {self.home} (server {self.server!r}).",
            )
        if f"[{self.server}]" not in self.config.read_text():
            raise BackupNotFoundError(
                f"The backup repository in {self.home} has no server {self.server!r}.",
            )

    # --- set-up --------------------------------------------------------------------------

    def init(self, primary: Connection, *, pg_bin: Path | None = None) -> None:
        """Create (or update) the repository for `primary`.

        Writes the Barman configuration, the primary's credentials (mode 0600) and, once, a
        GnuPG key with a random passphrase; creates the replication slot. Idempotent.

        Raises:
            BackupRepositoryMismatchError: The repository already backs up another cluster.
        """
        # Before writing anything: a repository of another cluster stays as it is.
        self.check_system_id(primary)
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.home.chmod(0o700)
        for folder in (self.barman_home, self.marks_dir, self.verification_dir, self.staging):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fields = (primary.host, str(primary.port), "*", primary.user, primary.password)
        _private(self.pgpass, ":".join(_pgpass_escape(f) for f in fields) + "\n")
        _private(
            self.connection_file,
            json.dumps(
                {
                    "host": primary.host,
                    "port": primary.port,
                    "user": primary.user,
                    "dbname": primary.dbname,
                }
            ),
        )
        fingerprint = self._ensure_key()
        bin_dir = pg_bin or binary("pg_basebackup").parent
        _private(self.config, self._render(primary, bin_dir, fingerprint))
        self.barman("receive-wal", "--create-slot", self.server, check=False)

    @property
    def staging(self) -> Path:
        """Where encrypted backups are decrypted and unpacked during a restore."""
        return self.home / "staging"

    def _render(self, primary: Connection, bin_dir: Path, fingerprint: str) -> str:
        lines = [
            "; Generated by `mhv backup init` (libs/cli/mhv_cli/backup.py); edit there, not here.",
            "[barman]",
            f"barman_user = {getpass.getuser()}",
            f"barman_home = {self.barman_home}",
            f"log_file = {self.log_file}",
            "log_level = INFO",
            f"path_prefix = {bin_dir}",
            "",
            f"[{self.server}]",
            "description = Mahavishnu PostgreSQL",
            f"conninfo = {primary.conninfo()}",
            f"streaming_conninfo = {primary.conninfo(replication=True)}",
            "backup_method = postgres",
            "streaming_archiver = on",
            f"streaming_archiver_name = {RECEIVER_NAME}",
            f"slot_name = {SLOT_NAME}",
            "create_slot = auto",
            "immediate_checkpoint = true",
            # Tar format, gzip at its fastest level: the private build of PostgreSQL has no LZ4
            # or Zstandard. Encryption needs the tar format.
            "backup_compression = gzip",
            "backup_compression_format = tar",
            "backup_compression_level = 1",
            "encryption = gpg",
            f"encryption_key_id = {fingerprint}",
            f"encryption_passphrase_command = cat {self.passphrase_file}",
            f"staging_path = {self.staging}",
            "staging_location = local",
            f"retention_policy = RECOVERY WINDOW OF {RECOVERY_WINDOW_DAYS} DAYS",
            "wal_retention_policy = main",
            "minimum_redundancy = 1",
            "last_backup_maximum_age = 1 DAYS",
            "",
        ]
        return "\n".join(lines)

    def _ensure_key(self) -> str:
        """The fingerprint of the repository's encryption key, created on first use."""
        self.gnupg.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.gnupg.chmod(0o700)
        if not self.passphrase_file.exists():
            _private(self.passphrase_file, secrets.token_urlsafe(32) + "\n")
        # The strongest fixed S2K count protects the private key: the agent's own calibration
        # of that count takes seconds on a busy machine, for every key it protects.
        _private(self.gnupg / "gpg-agent.conf", "s2k-count 65011712\n")
        found = self._fingerprint()
        if found:
            return found
        self._gpg(
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(self.passphrase_file),
            "--quick-gen-key",
            f"Mahavishnu backups ({self.server}) <backups@{self.server}.invalid>",
            "rsa3072",
            "encrypt",
            "never",
        )
        found = self._fingerprint()
        if not found:
            raise ConfigurationError("GnuPG did not create the backup encryption key.")
        return found

    def _fingerprint(self) -> str:
        listed = self._gpg("--batch", "--with-colons", "--list-secret-keys", check=False)
        for line in listed.stdout.splitlines():
            if line.startswith("fpr:"):
                return line.split(":")[9]
        return ""

    def _gpg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["gpg", "--homedir", str(self.gnupg), *args],
                capture_output=True,
                text=True,
                check=check,
                timeout=120,
            )
        except subprocess.CalledProcessError as exc:
            raise ConfigurationError(f"gpg failed: {exc.stderr.strip()[-300:]}") from exc
        finally:
            self._stop_gpg_agent()

    def _stop_gpg_agent(self) -> None:
        # gpg starts an agent per home folder that outlives it: stop it after every use.
        subprocess.run(
            ["gpgconf", "--homedir", str(self.gnupg), "--kill", "gpg-agent"],
            capture_output=True,
            check=False,
            timeout=30,
        )

    def primary(self) -> Connection:
        """The primary this repository backs up (password from its pgpass file)."""
        self.require()
        saved = json.loads(self.connection_file.read_text())
        fields = re.split(r"(?<!\\):", self.pgpass.read_text().rstrip("\n"), maxsplit=4)
        password = re.sub(r"\\(.)", r"\1", fields[4])
        return Connection(password=password, **saved)

    # --- running Barman ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for Barman and the PostgreSQL tools it runs."""
        env = dict(os.environ)
        env.update(GNUPGHOME=str(self.gnupg), PGPASSFILE=str(self.pgpass))
        return env

    def command(self, *args: str) -> list[str]:
        """A barman command line on this repository."""
        return [str(barman_binary()), "--config", str(self.config), *args]

    def barman(
        self, *args: str, check: bool = True, timeout: float = 3600
    ) -> subprocess.CompletedProcess[str]:
        """Run barman to completion.

        Raises:
            BackupFailedError: It failed (and `check`); the message carries its last words.
        """
        try:
            result = subprocess.run(
                self.command(*args),
                env=self.env(),
                capture_output=True,
                text=True,
                check=False,
                timeout=timeout,
            )
        finally:
            self._stop_gpg_agent()
        if check and result.returncode != 0:
            raise BackupFailedError(
                f"barman {args[0]} failed: {_last_words(result.stdout + result.stderr)}"
            )
        return result

    def barman_json(self, *args: str) -> Any:
        """Run barman with JSON output and return this server's part of it."""
        result = self.barman("--format", "json", *args)
        data = json.loads(result.stdout or "{}")
        return data.get(self.server, data)

    def start_receiver(self, *, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``barman receive-wal`` (pg_receivewal, synchronous) in the foreground.

        The caller owns the process: stop it with `stop_receiver`.
        """
        self.require()
        # A receiver left over by a process that died without stopping it holds the stream.
        self.barman("receive-wal", "--stop", self.server, check=False)
        self.barman("receive-wal", "--create-slot", self.server, check=False)
        sink = open(log or self.home / "receive-wal.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                self.command("receive-wal", self.server),
                env=self.env(),
                stdout=sink,
                stderr=sink,
                start_new_session=True,
            )
        finally:
            sink.close()

    def wait_streaming(self, *, timeout: float = 30.0) -> None:
        """Wait until the primary names the receiver its synchronous standby.

        Raises:
            BackupFailedError: Not so within `timeout` seconds.
        """
        primary = self.primary()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                state = _query(
                    primary,
                    "SELECT coalesce(max(sync_state), '') FROM pg_stat_replication"  # noqa: S608  # nosec B608: a constant statement
                    f" WHERE application_name = '{RECEIVER_NAME}'",
                )
                if state == "sync":
                    return
            time.sleep(0.2)
        raise BackupFailedError(
            f"The WAL receiver is not streaming synchronously (state {state or 'absent'!r}); "
            f"see {self.home / 'receive-wal.log'}."
        )

    @staticmethod
    def stop_receiver(process: subprocess.Popen[bytes], *, timeout: float = 15) -> None:
        """Stop a receiver started by `start_receiver` (and its pg_receivewal)."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 15)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait()

    def archive_wal(self) -> None:
        """Move completed WAL segments from the stream into the (encrypted) archive."""
        self.barman("archive-wal", self.server)

    def switch_wal(self, *, timeout: int = 60) -> None:
        """Close the primary's current WAL segment and wait until the repository archived it."""
        self.barman(
            "switch-wal", "--force", "--archive", "--archive-timeout", str(timeout), self.server
        )

    def maintain(self) -> None:
        """Barman's periodic work: archive streamed WAL, apply retention (``barman cron``)."""
        self.barman("cron", "--keep-descriptors", check=False)

    def check(self) -> dict[str, tuple[bool, str]]:
        """Barman's checks: name -> (ok, hint)."""
        self.require()
        result = self.barman("--format", "json", "check", self.server, check=False)
        try:
            data = json.loads(result.stdout)[self.server]
        except (ValueError, KeyError) as exc:
            raise BackupFailedError(
                f"barman check failed: {_last_words(result.stdout + result.stderr)}"
            ) from exc
        return {name: (v["status"] == "OK", v.get("hint", "")) for name, v in data.items()}

    # --- identity ------------------------------------------------------------------------

    def recorded_system_id(self) -> str:
        """The system identifier of the cluster this repository backs up ('' before any)."""
        identity = self.server_dir / "identity.json"
        if not identity.exists():
            return ""
        return str(json.loads(identity.read_text()).get("systemid", ""))

    def major_version(self) -> int:
        """The PostgreSQL major version of the cluster backed up (0 before any WAL)."""
        identity = self.server_dir / "identity.json"
        if not identity.exists():
            return 0
        return int(str(json.loads(identity.read_text()).get("version", "0")).split(".")[0])

    def bin_dir(self) -> Path:
        """Programs of the backed-up cluster's major version (WAL and data formats differ)."""
        major = self.major_version()
        return bin_dir_for(major) if major else binary("postgres").parent

    def check_system_id(self, primary: Connection) -> None:
        """Raise MHV-051 when the repository belongs to another cluster than `primary`'s."""
        recorded = self.recorded_system_id()
        if not recorded:
            return
        actual = _query(primary, "SELECT system_identifier::text FROM pg_control_system()")
        if actual and actual != recorded:
            raise BackupRepositoryMismatchError(
                f"The repository {self.home} (server {self.server!r}) backs up the cluster with "
                f"system identifier {recorded}; the database at {primary.host}:{primary.port} is "
                f"cluster {actual}."
            )

    # --- catalogue -----------------------------------------------------------------------

    def backups(self) -> list[BackupInfo]:
        """Every base backup, oldest first."""
        self.require()
        found = []
        for path in sorted((self.server_dir / "meta").glob("*-backup.info")):
            info = _read_info(path)
            backup_id = path.name.removesuffix("-backup.info")
            if not _BACKUP_ID.match(backup_id):
                continue
            found.append(
                BackupInfo(
                    backup_id=backup_id,
                    status=info.get("status", "UNKNOWN"),
                    begin_time=_time(info.get("begin_time")),
                    end_time=_time(info.get("end_time")),
                    size_bytes=_int(info.get("size")) + _int(info.get("wal_size")),
                    cluster_bytes=_int(info.get("cluster_size")),
                    keep=self._keep(backup_id),
                )
            )
        return found

    def _keep(self, backup_id: str) -> str:
        # Barman's keep annotation: a file holding the target (standalone or full).
        marker = self.server_dir / "meta" / f"{backup_id}-keep"
        return marker.read_text().strip() if marker.exists() else ""

    def completed(self) -> list[BackupInfo]:
        """Completed backups, oldest first."""
        return [b for b in self.backups() if b.done]

    def latest(self) -> BackupInfo:
        """The newest completed backup.

        Raises:
            BackupNotFoundError: There is none (MHV-050).
        """
        done = self.completed()
        if not done:
            raise BackupNotFoundError(f"The repository {self.home} holds no completed backup yet.")
        return done[-1]

    def find(self, backup_id: str) -> BackupInfo:
        """The backup `backup_id` (or ``latest``)."""
        if backup_id == "latest":
            return self.latest()
        for backup in self.backups():
            if backup.backup_id == backup_id:
                return backup
        raise BackupNotFoundError(f"The repository {self.home} has no backup {backup_id!r}.")

    def window(self) -> Window:
        """The point-in-time recovery window (see `Window`).

        Raises:
            BackupNotFoundError: No completed backup yet (MHV-050).
        """
        done = self.completed()
        pitr = [b for b in done if b.keep != "standalone"] or done[-1:]
        if not pitr:
            raise BackupNotFoundError(f"The repository {self.home} holds no completed backup yet.")
        start = pitr[0].end_time
        assert start is not None
        return Window(start, max(self.last_wal_time() or start, start))

    def last_wal_time(self) -> dt.datetime | None:
        """When WAL last reached the repository (the stream's partial segment, or the archive)."""
        newest = 0.0
        for folder in (self.server_dir / "streaming", self.server_dir / "wals"):
            for base, _dirs, files in os.walk(folder):
                for name in files:
                    if name.endswith(".db"):
                        continue
                    with contextlib.suppress(OSError):
                        newest = max(newest, os.stat(os.path.join(base, name)).st_mtime)
        return dt.datetime.fromtimestamp(newest, dt.UTC) if newest else None

    def last_commit_time(self) -> dt.datetime | None:
        """Time of the last commit in the streamed, not yet archived WAL (None: none there).

        Read with pg_waldump from the clear-text segments pg_receivewal is writing.
        """
        stream = self.server_dir / "streaming"
        segments = sorted(stream.glob("*")) if stream.is_dir() else []
        latest: dt.datetime | None = None
        with tempfile.TemporaryDirectory() as tmp:
            for segment in segments:
                name = segment.name.removesuffix(".partial")
                if not re.fullmatch(r"[0-9A-F]{24}", name):
                    continue
                copy = Path(tmp) / name
                shutil.copyfile(segment, copy)
                result = subprocess.run(
                    [str(self.bin_dir() / "pg_waldump"), "--rmgr=Transaction", str(copy)],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=120,
                )
                for match in re.finditer(
                    r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC", result.stdout
                ):
                    moment = dt.datetime.fromisoformat(match.group(1)).replace(tzinfo=dt.UTC)
                    latest = moment if latest is None else max(latest, moment)
                copy.unlink()
        return latest


def _private(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)


def _pgpass_escape(value: str) -> str:
    """A field of a libpq password file: backslash and colon escaped."""
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _last_words(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-4:]) or "no output"


def _read_info(path: Path) -> dict[str, str]:
    info = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _time(value: str | None) -> dt.datetime | None:
    if not value or value == "None":
        return None
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC)


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _query(primary: Connection, sql: str) -> str:
    """One value from the primary's maintenance database (in an event loop of its own)."""
    import asyncio

    import asyncpg

    async def fetch() -> str:
        conn = await asyncpg.connect(primary.url("postgres"), timeout=10)
        try:
            return str(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(fetch())


@contextlib.contextmanager
def watch(
    progress: Progress,
    sample: Callable[[], tuple[int, str]],
    *,
    interval: float = 0.5,
) -> Iterator[None]:
    """Update `progress` from `sample()` every `interval` seconds while the caller works."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):
                done, note = sample()
                progress.update(done, note=note)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def stream_lines(
    command: Sequence[str], *, env: dict[str, str], on_line: Callable[[str], None], timeout: float
) -> tuple[int, str]:
    """Run `command`, handing each output line to `on_line`; return (exit code, all output)."""
    lines = []
    deadline = time.monotonic() + timeout
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            on_line(line.rstrip())
            if time.monotonic() > deadline:
                process.kill()
                break
        code = process.wait()
    return code, "".join(lines)


__all__ = [
    "DEFAULT_SERVER",
    "PRIMARY_SETTINGS",
    "RECEIVER_NAME",
    "BackupInfo",
    "Connection",
    "Progress",
    "Repository",
    "Window",
    "barman_binary",
    "default_home",
    "folder_bytes",
]


# --- taking a backup ----------------------------------------------------------------------

# Checks that must pass before a backup; the others (age, redundancy, earlier failures) are
# what a backup repairs.
_BLOCKING_CHECKS = (
    "postgresql",
    "postgresql_streaming",
    "receive_wal_running",
    "replication_slot",
    "encryption",
    "directories",
    "pg_basebackup",
    "pg_basebackup_compatible",
    "systemid_coherence",
)


def blocking_failures(checks: dict[str, tuple[bool, str]]) -> list[str]:
    """The failed checks that prevent a backup, as ``name: hint``."""
    return [
        f"{name}: {hint or 'FAILED'}"
        for name, (ok, hint) in checks.items()
        if not ok and name in _BLOCKING_CHECKS
    ]


@dataclass(frozen=True, slots=True)
class BackupRun:
    """The outcome of `run_backup`.

    Attributes:
        backup: The new backup.
        seconds: Wall time of the base backup (the count mark excluded).
        database_bytes: Size of the databases when it started.
        mark_path: The count mark written after it.
    """

    backup: BackupInfo
    seconds: float
    database_bytes: int
    mark_path: Path


def _backup_progress(primary: Connection) -> tuple[int, str]:
    import asyncio

    import asyncpg

    async def fetch() -> tuple[int, str]:
        conn = await asyncpg.connect(primary.url("postgres"), timeout=5)
        try:
            row = await conn.fetchrow(
                "SELECT phase, backup_streamed, backup_total FROM pg_stat_progress_basebackup"
            )
        finally:
            await conn.close()
        if row is None:
            return 0, "waiting for WAL"
        return int(row["backup_streamed"] or 0), str(row["phase"])

    return asyncio.run(fetch())


def run_backup(
    repo: Repository, *, anchors_file: Path | None = None, out: TextIO | None = None
) -> BackupRun:
    """Take a full base backup now, keep it 30 days, and write its count mark.

    Retention itself (deleting what fell out of the window) is Barman's periodic work
    (`Repository.maintain`), which `mhv backup receive` runs every minute.

    Before the backup, the audit chain is verified and its head recorded as an anchor in
    `anchors_file` (default `mhv_cli.anchors.default_file`).

    Raises:
        BackupNotFoundError: No repository here (MHV-050).
        BackupRepositoryMismatchError: It backs up another cluster (MHV-051).
        BackupFailedError: A precondition or Barman failed (MHV-054).
    """
    import asyncio

    from mhv_cli import anchors
    from mhv_cli.marks import take_mark

    repo.require()
    primary = repo.primary()
    repo.check_system_id(primary)
    checks = repo.check()
    failures = blocking_failures(checks)
    if failures:
        raise BackupFailedError(f"Cannot back up now: {'; '.join(failures)}.")
    if not checks.get("wal_archive", (True, ""))[0]:
        # A new repository: prove the WAL path end to end before the first backup.
        repo.switch_wal()
    size = int(
        _query(primary, "SELECT sum(pg_database_size(datname))::bigint FROM pg_database") or 0
    )
    before = {b.backup_id for b in repo.backups()}
    progress = Progress("backup", size, out=out)
    anchor = asyncio.run(anchors.record(primary.url(), anchors_file or anchors.default_file()))
    progress.say(f"audit chain verified; anchor at row {anchor.head_id} recorded")
    progress.say(f"base backup of {_size(size)} to {repo.home}")
    started = time.monotonic()
    with watch(progress, lambda: _backup_progress(primary)):
        repo.barman("backup", "--wait", "--wait-timeout", "600", repo.server)
    seconds = time.monotonic() - started
    new = [b for b in repo.backups() if b.backup_id not in before and b.done]
    if not new:
        raise BackupFailedError("Barman reported success but no new completed backup exists.")
    backup = new[-1]
    progress.say(f"backup {backup.backup_id} done: {_size(backup.size_bytes)} stored")
    repo.barman("keep", "--target", "standalone", repo.server, backup.backup_id)
    _release_expired_keeps(repo)
    mark = asyncio.run(take_mark(primary.url(), backup.backup_id))
    path = mark.save(repo.marks_dir)
    progress.finish(f"count mark {mark.restore_point} at {mark.lsn}")
    return BackupRun(repo.find(backup.backup_id), seconds, size, path)


def _release_expired_keeps(repo: Repository) -> None:
    """Full backups are kept 30 days; older ones fall back to the 7-day recovery window."""
    horizon = dt.datetime.now(dt.UTC) - dt.timedelta(days=FULL_BACKUP_RETENTION_DAYS)
    for backup in repo.completed():
        if backup.keep and backup.end_time is not None and backup.end_time < horizon:
            repo.barman("keep", "--release", repo.server, backup.backup_id)
