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
from dataclasses import dataclass
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


@dataclass
class PrivateCluster:
    """One private cluster in `root` (created on first start).

    Attributes:
        root: Folder holding ``data/``, ``superuser.password`` and ``server.log``.
        port: TCP port on 127.0.0.1 (and on every address of `listen`).
        listen: Addresses the server listens on.
        clients: Networks (CIDR) besides loopback allowed to log in, with a password.
    """

    root: Path
    port: int
    listen: tuple[str, ...] = ("127.0.0.1",)
    clients: tuple[str, ...] = ()

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
                        str(binary("initdb")),
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
            _wrap([str(binary("pg_ctl")), "-D", str(self.data_dir), "status"]),
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def accepting(self) -> bool:
        """Whether the server accepts connections now (not starting up or shutting down)."""
        result = subprocess.run(
            [str(binary("pg_isready")), "-h", "127.0.0.1", "-p", str(self.port), "-t", "5"],
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
            ]
        )
        subprocess.run(
            _wrap(
                [
                    str(binary("pg_ctl")),
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
            _wrap([str(binary("pg_ctl")), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]),
            check=True,
            capture_output=True,
        )
