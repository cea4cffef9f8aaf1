"""A private PostgreSQL cluster from the pip-installed `pgserver` build.

`mhv up` uses it when ``MHV_DATABASE_URL`` is unset, and the test suite when no server is
reachable. The cluster listens on 127.0.0.1 only, with password (SCRAM) authentication and no
Unix socket; its data lives in a git-ignored folder.

PostgreSQL refuses to run as root. When we are root, the server runs inside a new user
namespace (``unshare --user``): there it sees itself as the unprivileged overflow user, while the
kernel still checks file access against our real (root) ownership, so the data folder can stay
wherever the checkout is, even under a directory only root may enter. No system user is created
and no permission is changed.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "postgres"


def _install_dir() -> Path:
    # Located without importing pgserver: its import has side effects we don't need.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package (private PostgreSQL build) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def binary(name: str) -> Path:
    """Path of a PostgreSQL program (postgres, pg_ctl, pgbench, ...) of the private build."""
    return _install_dir() / "bin" / name


# Where Debian (and the PGDG packages) install each major version's programs.
_SYSTEM_BIN = "/usr/lib/postgresql/{major}/bin"


def bin_dir_for(major: int) -> Path:
    """The programs of PostgreSQL `major`: the private build's, or the system's.

    Raises:
        RuntimeError: No installation of that major version here.
    """
    if major_version(binary("postgres").parent) == major:
        return binary("postgres").parent
    system = Path(_SYSTEM_BIN.format(major=major))
    if (system / "postgres").exists():
        return system
    raise RuntimeError(f"PostgreSQL {major} is not installed here")


def major_version(bin_dir: Path) -> int:
    """The major version of the PostgreSQL programs in `bin_dir`."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1].split(".")[0])


def contrib_bin_dir() -> Path:
    """Programs of a PostgreSQL with its contrib modules (amcheck), preferring the private build.

    The pip-installed build ships no contrib modules; Debian's packages do. Falls back to the
    private build when no system PostgreSQL is installed.
    """
    for major in (17, 16, 15):
        system = Path(_SYSTEM_BIN.format(major=major))
        if (system / "postgres").exists() and _has_extension(system, "amcheck"):
            return system
    return binary("postgres").parent


def _has_extension(bin_dir: Path, name: str) -> bool:
    share = subprocess.run(
        [str(bin_dir / "pg_config"), "--sharedir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return bool(share) and (Path(share) / "extension" / f"{name}.control").exists()


def _wrap(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError(
            "PostgreSQL cannot run as root and `unshare` (util-linux) is missing; "
            "run as an unprivileged user or set MHV_DATABASE_URL."
        )
    return [unshare, "--user", *argv]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setting(value: str) -> str:
    # pg_ctl passes -o through a shell: quote values, and an empty one as ''.
    return "'" + value.replace("'", "") + "'" if value == "" or " " in value else value


@dataclass
class PrivateCluster:
    """One private cluster in `root` (created on first start).

    Attributes:
        root: Folder holding ``data/``, ``superuser.password`` and ``server.log``.
        port: TCP port on 127.0.0.1 (and on every address of `listen`).
        listen: Addresses the server listens on.
        clients: Networks (CIDR) besides loopback allowed to log in, with a password.
        settings: Further server settings (``-c name=value`` at start), e.g. those a primary
            needs for synchronous WAL streaming (`mhv_cli.backup.PRIMARY_SETTINGS`).
        bin_dir: The PostgreSQL programs to run (default: the private build's).
    """

    root: Path
    port: int
    listen: tuple[str, ...] = ("127.0.0.1",)
    clients: tuple[str, ...] = ()
    settings: dict[str, str] = field(default_factory=dict)
    bin_dir: Path | None = None

    def binary(self, name: str) -> Path:
        """Path of one of this cluster's PostgreSQL programs."""
        return (self.bin_dir or binary("postgres").parent) / name

    @property
    def data_dir(self) -> Path:
        """The PostgreSQL data directory."""
        return self.root / "data"

    @property
    def password_file(self) -> Path:
        """File holding the superuser's password."""
        return self.root / "superuser.password"

    @property
    def log_file(self) -> Path:
        """Server log."""
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """Superuser URL for `database`."""
        password = self.password_file.read_text().strip()
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    def initialized(self) -> bool:
        """Whether the data directory holds a cluster."""
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        """Create the cluster with a random superuser password."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        password = secrets.token_urlsafe(24)
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        pwfile = self.root / ".initdb-pw"
        pwfile.write_text(password + "\n")
        try:
            subprocess.run(
                _wrap(
                    [
                        str(self.binary("initdb")),
                        "-D",
                        str(self.data_dir),
                        "-U",
                        SUPERUSER,
                        "--pwfile",
                        str(pwfile),
                        "--auth-host=scram-sha-256",
                        "--auth-local=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                        # Every page carries a checksum: corruption on disk, in a backup or
                        # in a restore is detected (pg_checksums, reads) instead of served.
                        "--data-checksums",
                        "--no-sync",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def running(self) -> bool:
        """Whether the server of this data directory is up."""
        if not self.initialized():
            return False
        result = subprocess.run(
            _wrap([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "status"]),
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def accepting(self) -> bool:
        """Whether the server accepts connections now (not starting up or shutting down)."""
        result = subprocess.run(
            [str(self.binary("pg_isready")), "-h", "127.0.0.1", "-p", str(self.port), "-t", "5"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def start(self, *, timeout: float = 60.0) -> None:
        """Initialise if needed and start the server; return when it accepts connections."""
        if not self.initialized():
            self.init()
        if self.running():
            if self.accepting():
                return
            # Up but refusing connections: typically still shutting down from a previous
            # run. Let it finish, then start afresh.
            self.stop()
        self._allow_clients()
        options = " ".join(
            [
                f"-p {self.port}",
                f"-c listen_addresses={','.join(self.listen)}",
                "-c unix_socket_directories=''",
                "-c max_connections=200",
                "-c shared_buffers=128MB",
                "-c fsync=on",
                *(f"-c {name}={_setting(value)}" for name, value in self.settings.items()),
            ]
        )
        subprocess.run(
            _wrap(
                [
                    str(self.binary("pg_ctl")),
                    "-D",
                    str(self.data_dir),
                    "-o",
                    options,
                    "-l",
                    str(self.log_file),
                    "-t",
                    str(int(timeout)),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.accepting():
                return
            time.sleep(0.1)
        raise RuntimeError(f"private PostgreSQL did not accept connections on {self.port}")

    def _allow_clients(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        wanted = [f"host all all {network} scram-sha-256" for network in self.clients]
        missing = [line for line in wanted if line not in lines]
        if missing:
            hba.write_text("\n".join([*lines, *missing]) + "\n")

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server if it runs."""
        if not self.running():
            return
        subprocess.run(
            _wrap([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]),
            check=True,
            capture_output=True,
        )
